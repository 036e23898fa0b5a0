"""The KVM userspace ABI for x86-64: ioctl numbers, exit reasons and ctypes structs.

Declared once, here, from the kernel's UAPI headers (``linux/kvm.h``,
``asm/kvm.h``).  Each ioctl number is derived from its direction, number and the
struct it carries, as the kernel's ``_IOR``/``_IOW``/``_IOWR`` macros derive it, so a
number cannot disagree with its struct; tests/test_kvm_abi.py compiles a C program
against the installed kernel headers and checks every number, constant, struct size
and field offset here against it.  Nothing in this module has behaviour.
"""

from __future__ import annotations

import ctypes
import enum

KVM_API_VERSION = 12
KVMIO = 0xAE  # the ioctl "type" byte of every KVM request

# asm-generic/ioctl.h: number in bits 0-7, type 8-15, argument size 16-29, direction 30-31.
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | number


def _io(number: int) -> int:
    return _ioc(_IOC_NONE, number, 0)


def _ior(number: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, number, ctypes.sizeof(struct))


def _iow(number: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, number, ctypes.sizeof(struct))


def _iowr(number: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, number, ctypes.sizeof(struct))


# KVM_CHECK_EXTENSION capabilities dksm asks about.
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SYNC_REGS = 74

# kvm_run.kvm_valid_regs / kvm_dirty_regs bits (x86): which register classes KVM
# copies into kvm_run.s.regs at each exit, and which it loads from there at entry.
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1

KVM_PIT_SPEAKER_DUMMY = 1
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1  # kvm_cpuid_entry2.flags: the leaf has subleaves
KVM_INTERNAL_ERROR_EMULATION = 1
# emulation_failure.flags: insn_size and insn_bytes hold the failing instruction.
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class ExitReason(enum.IntEnum):
    """``kvm_run.exit_reason`` values dksm handles or reports."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


REGS_NAMES = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags"


class Regs(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint64) for name in REGS_NAMES.split())


class Segment(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class DescriptorTable(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


KVM_NR_INTERRUPTS = 256


class Sregs(ctypes.Structure):
    _fields_ = (
        ("cs", Segment),
        ("ds", Segment),
        ("es", Segment),
        ("fs", Segment),
        ("gs", Segment),
        ("ss", Segment),
        ("tr", Segment),
        ("ldt", Segment),
        ("gdt", DescriptorTable),
        ("idt", DescriptorTable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class Fpu(ctypes.Structure):
    _fields_ = (
        ("fpr", (ctypes.c_uint8 * 16) * 8),
        ("fcw", ctypes.c_uint16),
        ("fsw", ctypes.c_uint16),
        ("ftwx", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("last_opcode", ctypes.c_uint16),
        ("last_ip", ctypes.c_uint64),
        ("last_dp", ctypes.c_uint64),
        ("xmm", (ctypes.c_uint8 * 16) * 16),
        ("mxcsr", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    )


class MsrEntry(ctypes.Structure):
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
    )


_variable_structs: dict[tuple[str, int], type[ctypes.Structure]] = {}


def msrs_struct(count: int) -> type[ctypes.Structure]:
    """``struct kvm_msrs`` with room for ``count`` entries (a flexible array)."""
    cached = _variable_structs.get(("msrs", count))
    if cached is not None:
        return cached

    class Msrs(ctypes.Structure):
        _fields_ = (
            ("nmsrs", ctypes.c_uint32),
            ("pad", ctypes.c_uint32),
            ("entries", MsrEntry * count),
        )

    _variable_structs[("msrs", count)] = Msrs
    return Msrs


class CpuidEntry2(ctypes.Structure):
    _fields_ = (
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    )


def cpuid2_struct(count: int) -> type[ctypes.Structure]:
    """``struct kvm_cpuid2`` with room for ``count`` entries."""
    cached = _variable_structs.get(("cpuid2", count))
    if cached is not None:
        return cached

    class Cpuid2(ctypes.Structure):
        _fields_ = (
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", CpuidEntry2 * count),
        )

    _variable_structs[("cpuid2", count)] = Cpuid2
    return Cpuid2


def msrs_table(entries: list[tuple[int, int]]) -> ctypes.Structure:
    """A ``struct kvm_msrs`` holding ``entries`` (MSR index, value)."""
    msrs = msrs_struct(len(entries))()
    msrs.nmsrs = len(entries)
    for i, (index, value) in enumerate(entries):
        msrs.entries[i].index = index
        msrs.entries[i].data = value
    return msrs


def cpuid2_table(entries: list[CpuidEntry2]) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` holding ``entries``."""
    cpuid = cpuid2_struct(len(entries))()
    cpuid.nent = len(entries)
    for i, entry in enumerate(entries):
        cpuid.entries[i] = entry
    return cpuid


class PitConfig(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15))


class LapicState(ctypes.Structure):
    _fields_ = (("regs", ctypes.c_char * 1024),)


class IrqLevel(ctypes.Structure):
    _fields_ = (("irq", ctypes.c_uint32), ("level", ctypes.c_uint32))


# struct kvm_ioeventfd.flags: match the written value, port IO instead of MMIO, remove.
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class IoEventFd(ctypes.Structure):
    """``struct kvm_ioeventfd``: a guest write of ``len`` bytes at ``addr`` (matching
    ``datamatch`` if asked) signals eventfd ``fd`` inside KVM, with no exit."""

    _fields_ = (
        ("datamatch", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 36),
    )


# struct kvm_irqfd.flags.
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0


class IrqFd(ctypes.Structure):
    """``struct kvm_irqfd``: a write to eventfd ``fd`` raises interrupt line ``gsi``
    inside KVM (an edge: asserted, then released)."""

    _fields_ = (
        ("fd", ctypes.c_uint32),
        ("gsi", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resamplefd", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 16),
    )


class Translation(ctypes.Structure):
    _fields_ = (
        ("linear_address", ctypes.c_uint64),
        ("physical_address", ctypes.c_uint64),
        ("valid", ctypes.c_uint8),
        ("writeable", ctypes.c_uint8),
        ("usermode", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    )


class Xsave(ctypes.Structure):
    _fields_ = (("region", ctypes.c_uint32 * 1024),)


KVM_MAX_XCRS = 16
XCR_XFEATURE_ENABLED_MASK = 0  # XCR0


class Xcr(ctypes.Structure):
    _fields_ = (
        ("xcr", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("value", ctypes.c_uint64),
    )


class Xcrs(ctypes.Structure):
    _fields_ = (
        ("nr_xcrs", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("xcrs", Xcr * KVM_MAX_XCRS),
        ("padding", ctypes.c_uint64 * 16),
    )


class VcpuException(ctypes.Structure):
    _fields_ = (
        ("injected", ctypes.c_uint8),
        ("nr", ctypes.c_uint8),
        ("has_error_code", ctypes.c_uint8),
        ("pending", ctypes.c_uint8),
        ("error_code", ctypes.c_uint32),
    )


class VcpuInterrupt(ctypes.Structure):
    _fields_ = (
        ("injected", ctypes.c_uint8),
        ("nr", ctypes.c_uint8),
        ("soft", ctypes.c_uint8),
        ("shadow", ctypes.c_uint8),
    )


class VcpuNmi(ctypes.Structure):
    _fields_ = (
        ("injected", ctypes.c_uint8),
        ("pending", ctypes.c_uint8),
        ("masked", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class VcpuSmi(ctypes.Structure):
    _fields_ = (
        ("smm", ctypes.c_uint8),
        ("pending", ctypes.c_uint8),
        ("smm_inside_nmi", ctypes.c_uint8),
        ("latched_init", ctypes.c_uint8),
    )


class VcpuTripleFault(ctypes.Structure):
    _fields_ = (("pending", ctypes.c_uint8),)


class VcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events (64 bytes): pending and injected exceptions,
    interrupts and NMIs.  dksm sets only the exception part; the rest travels
    unchanged from KVM_GET_VCPU_EVENTS to KVM_SET_VCPU_EVENTS."""

    _fields_ = (
        ("exception", VcpuException),
        ("interrupt", VcpuInterrupt),
        ("nmi", VcpuNmi),
        ("sipi_vector", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("smi", VcpuSmi),
        ("triple_fault", VcpuTripleFault),
        ("reserved", ctypes.c_uint8 * 26),
        ("exception_has_payload", ctypes.c_uint8),
        ("exception_payload", ctypes.c_uint64),
    )


# struct kvm_run: the fixed head, then the exit union at offset 32.
class RunIo(ctypes.Structure):
    _fields_ = (
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    )


class RunMmio(ctypes.Structure):
    _fields_ = (
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    )


class RunInternal(ctypes.Structure):
    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class RunEmulationFailure(ctypes.Structure):
    """The emulation-failure overlay of ``internal`` (same suberror and ndata)."""

    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("flags", ctypes.c_uint64),
        ("insn_size", ctypes.c_uint8),
        ("insn_bytes", ctypes.c_uint8 * 15),
    )


class RunFailEntry(ctypes.Structure):
    _fields_ = (
        ("hardware_entry_failure_reason", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
    )


class RunSystemEvent(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class RunExit(ctypes.Union):
    _fields_ = (
        ("io", RunIo),
        ("mmio", RunMmio),
        ("internal", RunInternal),
        ("emulation_failure", RunEmulationFailure),
        ("fail_entry", RunFailEntry),
        ("system_event", RunSystemEvent),
        ("padding", ctypes.c_char * 256),
    )


class SyncRegs(ctypes.Structure):
    """``struct kvm_sync_regs`` (x86), the head of ``kvm_run.s``."""

    # events is struct kvm_vcpu_events, which dksm never syncs: kept opaque.
    _fields_ = (("regs", Regs), ("sregs", Sregs), ("events", ctypes.c_uint8 * 64))


class Run(ctypes.Structure):
    """``struct kvm_run`` up to the end of ``s.regs``: the rest of the mapping (the
    union's padding to 2 KiB and anything after) is never read here."""

    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", RunExit),
        ("kvm_valid_regs", ctypes.c_uint64),
        ("kvm_dirty_regs", ctypes.c_uint64),
        ("s", SyncRegs),
    )


# Offsets inside struct kvm_lapic_state (the APIC register page).
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_DELIVERY_MODE_EXTINT = 7
APIC_DELIVERY_MODE_NMI = 4


# The requests, in kvm.h's order (docs/BOOT.md "Ioctl order" lists them with their numbers).
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, cpuid2_struct(0))
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, IrqLevel)
KVM_IRQFD = _iow(0x76, IrqFd)
KVM_CREATE_PIT2 = _iow(0x77, PitConfig)
KVM_IOEVENTFD = _iow(0x79, IoEventFd)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, Regs)
KVM_SET_REGS = _iow(0x82, Regs)
KVM_GET_SREGS = _ior(0x83, Sregs)
KVM_SET_SREGS = _iow(0x84, Sregs)
KVM_TRANSLATE = _iowr(0x85, Translation)
KVM_SET_MSRS = _iow(0x89, msrs_struct(0))
KVM_GET_FPU = _ior(0x8C, Fpu)
KVM_SET_FPU = _iow(0x8D, Fpu)
KVM_GET_LAPIC = _ior(0x8E, LapicState)
KVM_SET_LAPIC = _iow(0x8F, LapicState)
KVM_SET_CPUID2 = _iow(0x90, cpuid2_struct(0))
KVM_GET_TSC_KHZ = _io(0xA3)  # on a vCPU
KVM_GET_XSAVE = _ior(0xA4, Xsave)
KVM_SET_XSAVE = _iow(0xA5, Xsave)
KVM_GET_XCRS = _ior(0xA6, Xcrs)
KVM_GET_VCPU_EVENTS = _ior(0x9F, VcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, VcpuEvents)
