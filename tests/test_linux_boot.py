"""Debian's cloud kernel boots under ``dksm run`` with the busybox initramfs to its
``/init`` line, a shell prompt and a clean exit.

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
        "--verbose",
        timeout=BOOT_TIMEOUT_S + 60,
        env=env,
    )
    elapsed = time.monotonic() - started
    output = console.read_text(errors="replace")
    assert result.returncode == 0, f"{result.stderr}\n{output[-3000:]}"
    # /init ran, saw the command line the VMM gave, ran a shell, and rebooted.
    assert f"{linux.INIT_BANNER} {BOOT_ARGS}" in output, output[-3000:]
    assert re.search(r"# (?:echo )?" + re.escape(linux.SHELL_CHECK), output), output[-2000:]
    assert "reboot: Restarting system" in output
    assert "Kernel panic" not in output and "BUG:" not in output
    print(f"Linux booted to /init and exited in {elapsed:.0f} s")
