"""Typed vCPU exits: what ``kvm_run`` says after ``KVM_RUN``, decoded in one place.

``kvm_run``'s exit union means something different for each exit reason, and some
of its members say themselves which of their fields are valid (the emulation
failure's instruction bytes exist only when its flag says so).  :func:`decode`
reads the union once, by reason, through the named fields of :mod:`dksm.kvm.abi`,
and returns one frozen value per kind of exit, so no caller reads the union at
raw offsets or trusts a field the kernel did not fill.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from dksm.kvm import abi

# The longest x86 instruction; also the size of emulation_failure.insn_bytes.
MAX_INSTRUCTION_LENGTH = 15
# flags, insn_size + insn_bytes: the data words an emulation failure with bytes holds.
_EMULATION_FAILURE_WORDS = 3


# The two exits a running guest makes most (thousands a second) are plain slotted
# classes, not frozen ones: a frozen dataclass sets each field through
# object.__setattr__, 0.6 µs more per exit (of ~17 µs per port I/O round trip,
# measured).  Nothing changes them after decode; their data is kvm_run's anyway.
@dataclass(slots=True)
class IoExit:
    """Port I/O: ``count`` accesses of ``size`` bytes; ``data`` lies in ``kvm_run``
    (the guest reads what is written into it on an IN)."""

    port: int
    size: int
    count: int
    is_write: bool
    data: memoryview


@dataclass(slots=True)
class MmioExit:
    """An access to guest-physical memory no slot covers; ``data`` is writable for a read."""

    address: int
    length: int
    is_write: bool
    data: memoryview


@dataclass(frozen=True, slots=True)
class Halted:
    """HLT with no in-kernel LAPIC to wait in."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault."""


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A signal (or ``immediate_exit``) ended ``KVM_RUN`` early."""


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """Reset, shutdown or crash, as the guest asked the platform (``KVM_SYSTEM_EVENT_*``)."""

    type: int


@dataclass(frozen=True, slots=True)
class FailEntry:
    """The hardware refused to enter the guest."""

    hardware_reason: int


@dataclass(frozen=True, slots=True)
class EmulationFailure:
    """KVM could not emulate an instruction; ``instruction`` holds its bytes when KVM
    gave them (empty otherwise: read them from guest memory at RIP)."""

    instruction: bytes


@dataclass(frozen=True, slots=True)
class InternalError:
    """Any other KVM internal error."""

    suberror: int


@dataclass(frozen=True, slots=True)
class OtherExit:
    """An exit reason dksm does not handle."""

    reason: int


VcpuExit = (
    IoExit
    | MmioExit
    | Halted
    | Shutdown
    | Interrupted
    | SystemEvent
    | FailEntry
    | EmulationFailure
    | InternalError
    | OtherExit
)


def _bytes_at(address: int, size: int) -> memoryview:
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def _emulation_failure(run: abi.Run) -> EmulationFailure:
    failure = run.exit.emulation_failure
    has_bytes = (
        failure.ndata >= _EMULATION_FAILURE_WORDS
        and failure.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    )
    if not has_bytes:
        return EmulationFailure(b"")
    count = min(failure.insn_size, MAX_INSTRUCTION_LENGTH)
    return EmulationFailure(bytes(failure.insn_bytes)[:count])


_IO = int(abi.ExitReason.IO)
_MMIO = int(abi.ExitReason.MMIO)


def decode(run: abi.Run, mapping: memoryview | None = None) -> VcpuExit:
    """The exit ``run`` describes; ``run`` must be the vCPU's ``kvm_run`` mapping
    itself (I/O data is found at an offset from it).  ``mapping``, bytes of the
    whole mapping (``Vcpu.run_bytes``), makes a port I/O exit's data a slice of it:
    bounded by the mapping, and a tenth of the cost of a new view per exit."""
    reason = run.exit_reason
    if reason == _IO:
        io = run.exit.io
        size = io.size
        count = io.count
        offset = io.data_offset
        if mapping is not None:
            data = mapping[offset : offset + size * count]
        else:
            data = _bytes_at(ctypes.addressof(run) + offset, size * count)
        return IoExit(io.port, size, count, io.direction == abi.KVM_EXIT_IO_OUT, data)
    if reason == _MMIO:
        mmio = run.exit.mmio
        data = memoryview(mmio.data).cast("B")[: min(mmio.len, len(mmio.data))]
        return MmioExit(mmio.phys_addr, mmio.len, bool(mmio.is_write), data)
    if reason == abi.ExitReason.HLT:
        return Halted()
    if reason == abi.ExitReason.SHUTDOWN:
        return Shutdown()
    if reason == abi.ExitReason.INTR:
        return Interrupted()
    if reason == abi.ExitReason.SYSTEM_EVENT:
        return SystemEvent(run.exit.system_event.type)
    if reason == abi.ExitReason.FAIL_ENTRY:
        return FailEntry(run.exit.fail_entry.hardware_entry_failure_reason)
    if reason == abi.ExitReason.INTERNAL_ERROR:
        if run.exit.internal.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
            return _emulation_failure(run)
        return InternalError(run.exit.internal.suberror)
    return OtherExit(reason)
