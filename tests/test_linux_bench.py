"""The pieces of ``dksm bench linux`` on real VMs of the guest kit: kernel pages'
states after a run, copies compared across VMs, and the post-boot merge that
hands copied pages back to the pool so that VMs share them again.

cowprobe writes into a page of its read-only data (guests/README.md): the page
is mapped from the pool at load and becomes a private copy, the same in every VM.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dksm.bench.linux import (
    BootWatch,
    _kernel_ranges,
    _states,
    plot,
    run_mode,
)
from dksm.dedup.pool import PagePool
from dksm.fleet.instance import DedupMode, Instance, InstanceSpec
from dksm.guests import guest_path
from dksm.memory.page_states import PageState
from dksm.vmm.config import VmConfig
from dksm.vmm.machine import ExitCause

from conftest import dksm, requires_kvm

pytestmark = requires_kvm


def test_post_boot_merge_shares_identical_copies_across_vms() -> None:
    config = VmConfig(kernel_path=str(guest_path("cowprobe")), boot_args="", mem_mib=16)
    ranges, original = _kernel_ranges(config.kernel_path, config.mem_size)
    domain = f"test-linux-bench-{os.getpid()}"
    spec = InstanceSpec(config=config, dedup=DedupMode.DKSM, domain=domain)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(contextlib.closing(PagePool.open(domain)))
        vms = []
        consoles = []
        for _ in range(2):
            lease = pool.lease()
            stack.callback(lease.release)
            console = io.BytesIO()
            instance = stack.enter_context(
                Instance(spec, console, sharer=lease, merge_after=b"cowprobe: ready")
            )
            vms.append(instance)
            consoles.append(console)
        entries_at_load = pool.stats().hashtable_entries
        for instance in vms:  # one after the other: the second finds the first's page
            instance.vm.start()
            deadline = time.monotonic() + 30
            while instance.boot_merge is None or instance.boot_merge.result is None:
                assert time.monotonic() < deadline, "cowprobe did not get ready"
                time.sleep(0.05)
            instance.vm.stop(ExitCause.INTERRUPTED, "test done")  # it idles once ready
        results = [instance.boot_merge.result for instance in vms if instance.boot_merge]
        assert [r.copied for r in results if r] == [1, 1]  # the page cowprobe wrote
        assert [(r.merged, r.stored) for r in results if r] == [(0, 1), (1, 0)]
        # One new pool page, mapped by both VMs again, holding what cowprobe wrote.
        assert pool.stats().hashtable_entries == entries_at_load + 1
        for instance in vms:
            states = _states(instance, ranges)
            assert PageState.ANONYMOUS not in states.values()
        page = int(consoles[0].getvalue().split(b"page=")[1].split()[0], 16)
        assert [r.pages for r in results if r] == [[page], [page]]
        assert vms[0].vm.memory.read(page, 4096) != original[page]
        assert vms[1].vm.memory.read(page, 4096) == vms[0].vm.memory.read(page, 4096)
    with contextlib.closing(PagePool.open(domain)) as pool:
        pool.purge()


def test_boot_watch_times_the_kernel_boot_once_and_tees_the_console(tmp_path: Path) -> None:
    with open(tmp_path / "console.log", "wb", buffering=0) as tee:
        watch = BootWatch(tee)
        watch.write(b"[    0.1] booting\n")
        watch.write(b"[    2.0] Run /init as ")  # the line split across writes
        watch.write(b"init process\n")
        first = watch.banner_s
        watch.write(b"[    2.1] Run /init as init process\n")
    assert first is not None and watch.banner_s == first
    assert watch.first_byte_s is not None
    assert (tmp_path / "console.log").read_bytes() == bytes(watch.text)


def test_merge_after_in_confined_vmms_shares_the_page_both_rewrote(tmp_path: Path) -> None:
    """``dksm run --merge-after``: each VMM, confined, merges the page its cowprobe
    wrote once the guest is ready; the second finds the first's copy in the pool."""
    pool_root = tempfile.mkdtemp(prefix="dksm-test-boot-merge-", dir="/dev/shm")
    try:
        common = ["run", "--kernel", "cowprobe", "--mem-mib", "16", "--pool-root", pool_root,
                  "--merge-after", "cowprobe: ready", "--verbose"]  # fmt: skip
        first = subprocess.Popen(
            [sys.executable, "-m", "dksm", *common, "--timeout", "8"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)  # the first has stored its page (cowprobe is ready in ~0.1 s)
        second = dksm(*common, "--timeout", "1")
        _, first_err = first.communicate(timeout=60)
    finally:
        shutil.rmtree(pool_root)
    assert "1 copied kernel pages back in the pool (0 found there, 1 new)" in first_err
    assert "1 copied kernel pages back in the pool (1 found there, 0 new)" in second.stderr
    assert first.returncode == second.returncode == 5  # their --timeout, no SIGSYS


def test_run_mode_samples_memory_and_tallies_every_kernel_page(tmp_path: Path) -> None:
    """The experiment's whole path on a guest that boots in milliseconds: cowprobe
    copies one page of its read-only data and is stopped by the timeout."""
    result = run_mode(
        "dksm",
        2,
        kernel=str(guest_path("cowprobe")),
        initrd="",
        boot_args="",
        mem_mib=16,
        timeout=2.0,
        console_dir=tmp_path,
    )
    assert len(result.vms) == 2 and result.samples
    for vm in result.vms:
        assert vm.pages_at_load > 0
        assert sum(vm.states.values()) == vm.pages_at_load
        assert vm.states[PageState.ANONYMOUS.value] >= 1  # the page cowprobe wrote
        assert "timeout" in vm.cause
    assert result.identical_copies == result.vms[1].states[PageState.ANONYMOUS.value]
    assert b"cowprobe: ready" in (tmp_path / "dksm-x2-vm1.log").read_bytes()
    plot([result], tmp_path / "memory.png")
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"
