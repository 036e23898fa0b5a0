"""The KVM userspace ABI for x86-64: ioctl numbers, exit reasons and ctypes structs.

Declared once, here, from the kernel's UAPI headers (``linux/kvm.h``,
``asm/kvm.h``); sizes are asserted in the tests against the numbers in docs/BOOT.md.
Nothing in this module has behaviour.
"""

from __future__ import annotations

import ctypes
import enum

KVM_API_VERSION = 12

# _IO(0xAE, n) and friends, precomputed (docs/BOOT.md "Ioctl order").
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_GET_SUPPORTED_CPUID = 0xC008AE05
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_CREATE_IRQCHIP = 0xAE60
KVM_IRQ_LINE = 0x4008AE61
KVM_IRQFD = 0x4020AE76
KVM_CREATE_PIT2 = 0x4040AE77
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_TRANSLATE = 0xC018AE85
KVM_SET_MSRS = 0x4008AE89
KVM_GET_FPU = 0x81A0AE8C
KVM_SET_FPU = 0x41A0AE8D
KVM_GET_LAPIC = 0x8400AE8E
KVM_SET_LAPIC = 0x4400AE8F
KVM_SET_CPUID2 = 0x4008AE90
KVM_GET_XSAVE = 0x9000AEA4
KVM_SET_XSAVE = 0x5000AEA5
KVM_GET_XCRS = 0x8188AEA6  # _IOR(0xAE, 0xa6, struct kvm_xcrs)
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_TSC_KHZ = 0xAEA3  # _IO(0xAE, 0xa3), on a vCPU
KVM_GET_VCPU_EVENTS = 0x8040AE9F  # _IOR(0xAE, 0x9f, struct kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = 0x4040AEA0  # _IOW(0xAE, 0xa0, struct kvm_vcpu_events)

# KVM_CHECK_EXTENSION capabilities dksm asks about.
KVM_CAP_SYNC_REGS = 74

# kvm_run.kvm_valid_regs / kvm_dirty_regs bits (x86): which register classes KVM
# copies into kvm_run.s.regs at each exit, and which it loads from there at entry.
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1

KVM_PIT_SPEAKER_DUMMY = 1
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1  # kvm_cpuid_entry2.flags: the leaf has subleaves
KVM_INTERNAL_ERROR_EMULATION = 1


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


class PitConfig(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32 * 15))


class LapicState(ctypes.Structure):
    _fields_ = (("regs", ctypes.c_char * 1024),)


class IrqLevel(ctypes.Structure):
    _fields_ = (("irq", ctypes.c_uint32), ("level", ctypes.c_uint32))


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


class VcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events (64 bytes): pending and injected exceptions,
    interrupts and NMIs.  Only the exception part is named; the rest travels
    unchanged from KVM_GET_VCPU_EVENTS to KVM_SET_VCPU_EVENTS."""

    _fields_ = (
        ("exception_injected", ctypes.c_uint8),
        ("exception_nr", ctypes.c_uint8),
        ("exception_has_error_code", ctypes.c_uint8),
        ("exception_pending", ctypes.c_uint8),
        ("exception_error_code", ctypes.c_uint32),
        ("rest", ctypes.c_uint8 * 56),
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
        ("fail_entry", RunFailEntry),
        ("system_event", RunSystemEvent),
        ("padding", ctypes.c_char * 256),
    )


class SyncRegs(ctypes.Structure):
    """``struct kvm_sync_regs`` (x86), the head of ``kvm_run.s``."""

    _fields_ = (("regs", Regs), ("sregs", Sregs))


class Run(ctypes.Structure):
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
