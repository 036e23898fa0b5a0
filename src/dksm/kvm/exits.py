"""Typed vCPU exits: what ``kvm_run`` says after ``KVM_RUN``, decoded in one place.

``kvm_run``'s exit union means something different for each exit reason, and some
of its members say themselves which of their fields are valid (the emulation
failure's instruction bytes exist only when its flag says so).  :func:`decode`
reads the union once, by reason, through the named fields of :mod:`dksm.kvm.abi`,
and returns one value per kind of exit, so no caller reads the union at
raw offsets or trusts a field the kernel did not fill.
"""

from __future__ import annotations

import ctypes

from dksm.kvm import abi
from dksm.value import Value

# The longest x86 instruction; also the size of emulation_failure.insn_bytes.
MAX_INSTRUCTION_LENGTH = 15
# flags, insn_size + insn_bytes: the data words an emulation failure with bytes holds.
_EMULATION_FAILURE_WORDS = 3


class IoExit(Value):
    """Port I/O: ``count`` accesses of ``size`` bytes; ``data`` lies in ``kvm_run``
    (the guest reads what is written into it on an IN)."""

    __slots__ = ("count", "data", "is_write", "port", "size")

    def __init__(self, port: int, size: int, count: int, is_write: bool, data: memoryview) -> None:
        self.port = port
        self.size = size
        self.count = count
        self.is_write = is_write
        self.data = data


class MmioExit(Value):
    """An access to guest-physical memory no slot covers; ``data`` is writable for a read."""

    __slots__ = ("address", "data", "is_write", "length")

    def __init__(self, address: int, length: int, is_write: bool, data: memoryview) -> None:
        self.address = address
        self.length = length
        self.is_write = is_write
        self.data = data


class Halted(Value):
    """HLT with no in-kernel LAPIC to wait in."""

    __slots__ = ()


class Shutdown(Value):
    """Triple fault."""

    __slots__ = ()


class Interrupted(Value):
    """A signal (or ``immediate_exit``) ended ``KVM_RUN`` early."""

    __slots__ = ()


class SystemEvent(Value):
    """Reset, shutdown or crash, as the guest asked the platform (``KVM_SYSTEM_EVENT_*``)."""

    __slots__ = ("type",)

    def __init__(self, type: int) -> None:
        self.type = type


class FailEntry(Value):
    """The hardware refused to enter the guest."""

    __slots__ = ("hardware_reason",)

    def __init__(self, hardware_reason: int) -> None:
        self.hardware_reason = hardware_reason


class EmulationFailure(Value):
    """KVM could not emulate an instruction; ``instruction`` holds its bytes when KVM
    gave them (empty otherwise: read them from guest memory at RIP)."""

    __slots__ = ("instruction",)

    def __init__(self, instruction: bytes) -> None:
        self.instruction = instruction


class InternalError(Value):
    """Any other KVM internal error."""

    __slots__ = ("suberror",)

    def __init__(self, suberror: int) -> None:
        self.suberror = suberror


class OtherExit(Value):
    """An exit reason dksm does not handle."""

    __slots__ = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason


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
