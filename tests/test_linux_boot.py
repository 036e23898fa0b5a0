"""Debian's cloud kernel boots under ``dksm run`` with the busybox initramfs to its
``/init`` line, a shell prompt and a clean exit, in a confined VMM (when run as
root) with the page pool, and the post-boot merge hands back the pages it rewrote.

One boot is long on a PVM host (guest kernel code is emulated, about 1 µs per
instruction: docs/BOOT.md), so this test runs only when asked:

    DKSM_LINUX_BOOT=1 .venv/bin/pytest tests/test_linux_boot.py

It fetches the guest into a private cache first (or uses ``DKSM_GUEST_CACHE``),
and skips with the reason where the Debian packages cannot be had.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from dksm.guests import linux

from conftest import dksm, requires_kvm

pytestmark = [
    requires_kvm,
    pytest.mark.skipif(
        os.environ.get("DKSM_LINUX_BOOT") != "1",
        reason="a Linux boot takes minutes on a PVM host; run with DKSM_LINUX_BOOT=1",
    ),
]

BOOT_ARGS = f"{linux.BOOT_ARGS} dksm.test=booted"
BOOT_TIMEOUT_S = 3000


# What this host's KVM does with a system call from guest user mode when it is PVM
# (docs/BOOT.md): RIP goes to the kernel's entry, the mode stays user, and the
# fetch faults, so /init dies at its first system call and the kernel panics.
PVM_SYSCALL_FAULT = re.compile(
    r"init\[1\]: segfault at (\w+) ip \1 .*\n(?:.*\n)*?.*Attempted to kill init"
)


def test_debian_cloud_kernel_boots_to_init_and_exits_cleanly(
    linux_cache: Path, tmp_path: Path
) -> None:
    env = {**os.environ, linux.CACHE_ENV: str(linux_cache)}
    console = tmp_path / "console.log"
    started = time.monotonic()
    result = dksm(
        "run",
        "--kernel",
        "linux",
        "--initrd",
        "linux-initrd",
        "--boot-args",
        BOOT_ARGS,
        "--serial-out",
        str(console),
        "--timeout",
        str(BOOT_TIMEOUT_S),
        "--merge-after",
        linux.KERNEL_BOOTED,
        "--verbose",
        timeout=BOOT_TIMEOUT_S + 60,
        env=env,
    )
    elapsed = time.monotonic() - started
    output = console.read_text(errors="replace")
    print(f"Linux ran and its VM ended in {elapsed:.0f} s")
    # The VM ended through the i8042 reset (reboot=k), in a confined VMM when run as
    # root, with no SIGSYS and no emulation failure on the way.
    assert result.returncode == 0, f"{result.stderr}\n{output[-3000:]}"
    assert f"Command line: {BOOT_ARGS}" in output
    assert f"{linux.KERNEL_BOOTED}" in output, output[-3000:]
    # The VMM merged the pages the kernel rewrote while booting.
    merge = re.search(r"post-boot merge at [\d.]+ s: (\d+) copied kernel pages", result.stderr)
    assert merge is not None and int(merge.group(1)) > 0, result.stderr
    if linux.INIT_BANNER not in output and PVM_SYSCALL_FAULT.search(output):
        pytest.xfail("this host's KVM (PVM) does not deliver system calls from guest user mode")
    # /init ran, saw the command line the VMM gave, ran a shell, and rebooted.
    assert f"{linux.INIT_BANNER} {BOOT_ARGS}" in output, output[-3000:]
    assert re.search(r"# (?:echo )?" + re.escape(linux.SHELL_CHECK), output), output[-2000:]
    assert "reboot: Restarting system" in output
    assert "Kernel panic" not in output and "BUG:" not in output
