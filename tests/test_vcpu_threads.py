"""The vCPU threads of one VM on real /dev/kvm: an exclusive section holds every other
vCPU outside the guest (what keeps an instruction the VMM executes for the guest
atomic across vCPUs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from dksm.vmm.builder import build
from dksm.vmm.config import VmConfig
from dksm.vmm.machine import ExitCause

from conftest import requires_kvm

pytestmark = requires_kvm

AsmGuest = Callable[[str], Path]


class Sink:
    def write(self, data: bytes, /) -> int:
        return len(data)


def test_exclusive_section_holds_the_other_vcpus_outside_the_guest(asm_guest: AsmGuest) -> None:
    """vCPU 0 reads an unclaimed port in a loop (each read an exit the bus counts);
    vCPU 1, never started by the guest, takes the VM exclusively.  While it holds it,
    vCPU 0 is parked and makes no progress at all; once it lets go, vCPU 0 runs on."""
    config = VmConfig(kernel_path=str(asm_guest("unclaimed_spin")), mem_mib=16, vcpu_count=2)
    with build(config, serial_sink=Sink()) as vm:
        vm.start()
        deadline = time.monotonic() + 10
        while vm.bus.unclaimed_accesses < 100:
            assert time.monotonic() < deadline, "vCPU 0 does not run"
            time.sleep(0.01)
        with vm.exclusive(vm.threads[1]):
            held_at = vm.bus.unclaimed_accesses
            time.sleep(0.3)
            assert vm.bus.unclaimed_accesses == held_at
        time.sleep(0.3)
        assert vm.bus.unclaimed_accesses > held_at + 10
        vm.stop(ExitCause.INTERRUPTED, "test done")
        assert vm.outcome is not None
        assert not any(thread.alive() for thread in vm.threads)


def test_pause_holds_every_vcpu_until_resume(asm_guest: AsmGuest) -> None:
    """Pausing (PATCH /vm) takes the VM for the VMM itself: the spinning vCPU and the
    one the guest never started are both held outside, nothing runs until resume,
    and a VM stopped while paused ends at once."""
    config = VmConfig(kernel_path=str(asm_guest("unclaimed_spin")), mem_mib=16, vcpu_count=2)
    with build(config, serial_sink=Sink()) as vm:
        vm.start()
        deadline = time.monotonic() + 10
        while vm.bus.unclaimed_accesses < 100:
            assert time.monotonic() < deadline, "vCPU 0 does not run"
            time.sleep(0.01)
        assert vm.pause()
        assert vm.paused
        held_at = vm.bus.unclaimed_accesses
        time.sleep(0.3)
        assert vm.bus.unclaimed_accesses == held_at
        assert vm.pause()  # pausing a paused VM is a no-op
        vm.resume()
        assert not vm.paused
        time.sleep(0.3)
        assert vm.bus.unclaimed_accesses > held_at + 10
        assert vm.pause()
        started = time.monotonic()
        vm.stop(ExitCause.INTERRUPTED, "stopped while paused")
        assert time.monotonic() - started < 5
        assert vm.outcome is not None and vm.outcome.cause is ExitCause.INTERRUPTED
