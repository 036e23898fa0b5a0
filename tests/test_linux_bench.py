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
import time
from pathlib import Path

from dksm.bench.linux import (
    BootWatch,
    VmResult,
    _kernel_ranges,
    _merge_copied,
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

from conftest import requires_kvm

pytestmark = requires_kvm


def test_post_boot_merge_shares_identical_copies_across_vms(tmp_path: object) -> None:
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
            instance = stack.enter_context(Instance(spec, console, sharer=lease))
            vms.append((instance, lease))
            consoles.append(console)
        for instance, _ in vms:
            instance.vm.start()
        deadline = time.monotonic() + 30
        while not all(b"cowprobe: ready" in c.getvalue() for c in consoles):
            assert time.monotonic() < deadline, "cowprobe did not get ready"
            time.sleep(0.05)
        for instance, _ in vms:  # it idles once ready: stop it, its memory stays
            instance.vm.stop(ExitCause.INTERRUPTED, "test done")
        copied = [
            [a for a, s in _states(instance, ranges).items() if s == PageState.ANONYMOUS]
            for instance, _ in vms
        ]
        assert copied[0] and copied[0] == copied[1]  # the same page, copied in each VM
        page = copied[0][0]
        assert vms[0][0].vm.memory.read(page, 4096) != original[page]
        entries_before = pool.stats().hashtable_entries
        results = [VmResult(None, None, "", 0, {}) for _ in vms]
        for (instance, lease), result in zip(vms, results, strict=True):
            _merge_copied(instance, lease, ranges, result)
        # The first VM's copy became one new pool page, the second found it there.
        assert pool.stats().hashtable_entries == entries_before + len(copied[0])
        for instance, _ in vms:
            states = _states(instance, ranges)
            assert all(states[a] != PageState.ANONYMOUS for a in copied[0])
        assert results[0].states_before_merge[PageState.ANONYMOUS.value] == len(copied[0])
        assert vms[1][0].vm.memory.read(page, 4096) == vms[0][0].vm.memory.read(page, 4096)
    with contextlib.closing(PagePool.open(domain)) as pool:
        pool.purge()


def test_boot_watch_calls_back_once_at_the_init_banner() -> None:
    calls: list[int] = []
    watch = BootWatch(lambda: calls.append(1))
    watch.write(b"[    0.1] booting\n")
    watch.write(b"dksm-init: /proc/cmd")  # the banner split across writes
    watch.write(b"line: console=ttyS0\n")
    watch.write(b"dksm-init: /proc/cmdline: again\n")
    assert calls == [1]
    assert watch.banner_s is not None and watch.first_byte_s is not None


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
