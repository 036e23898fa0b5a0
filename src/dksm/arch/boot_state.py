"""The initial state of a 64-bit Linux-boot-protocol vCPU, as Firecracker sets it.

Page tables and the GDT are written into a guest-RAM buffer; registers, segments,
MSRs and the LAPIC are computed as KVM structs for the VMM to install (CPUID has
its own module, :mod:`dksm.arch.cpuid`).
The values follow docs/BOOT.md ("Initial vCPU state").
"""

from __future__ import annotations

import struct

from dksm.arch import layout
from dksm.kvm import abi

# GDT entries (flags, base, limit packed as the CPU reads them).
GDT_NULL = 0
GDT_CODE = 0x00AF9B000000FFFF  # 64-bit code, selector 0x08
GDT_DATA = 0x00CF93000000FFFF  # data, selector 0x10
GDT_TSS = 0x008F8B000000FFFF  # busy 64-bit TSS, selector 0x18
GDT_ENTRIES = (GDT_NULL, GDT_CODE, GDT_DATA, GDT_TSS)

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18

X86_CR0_PE = 0x1
X86_CR0_PG = 0x8000_0000
X86_CR4_PAE = 0x20
EFER_LME = 0x100
EFER_LMA = 0x400

PTE_PRESENT_WRITABLE = 0x3
PDE_PRESENT_WRITABLE_HUGE = 0x83

FPU_CONTROL_WORD = 0x37F
MXCSR_DEFAULT = 0x1F80

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 0x1


def page_tables() -> list[tuple[int, bytes]]:
    """Identity-map guest-physical 0-1 GiB with 2 MiB pages: (guest address, bytes)
    of each table."""
    entries = [(i << 21) | PDE_PRESENT_WRITABLE_HUGE for i in range(512)]
    return [
        (layout.PML4_ADDR, struct.pack("<Q", layout.PDPT_ADDR | PTE_PRESENT_WRITABLE)),
        (layout.PDPT_ADDR, struct.pack("<Q", layout.PD_ADDR | PTE_PRESENT_WRITABLE)),
        (layout.PD_ADDR, struct.pack("<512Q", *entries)),
    ]


def gdt_and_idt() -> list[tuple[int, bytes]]:
    """(guest address, bytes) of the GDT and of the (empty) IDT."""
    return [
        (layout.GDT_ADDR, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)),
        (layout.IDT_ADDR, struct.pack("<Q", 0)),
    ]


def write_page_tables(ram: memoryview) -> None:
    for address, data in page_tables():
        ram[address : address + len(data)] = data


def write_gdt_and_idt(ram: memoryview) -> None:
    for address, data in gdt_and_idt():
        ram[address : address + len(data)] = data


def _segment_from_gdt(entry: int, selector: int) -> abi.Segment:
    """The ``kvm_segment`` KVM wants for a GDT descriptor, field by field."""
    return abi.Segment(
        base=((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=(entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16),
        selector=selector,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=(entry >> 55) & 1,
        avl=(entry >> 52) & 1,
        unusable=0 if (entry >> 47) & 1 else 1,
    )


def configure_sregs(sregs: abi.Sregs) -> None:
    """Long mode with paging, flat segments from the boot GDT."""
    code = _segment_from_gdt(GDT_CODE, CODE_SELECTOR)
    data = _segment_from_gdt(GDT_DATA, DATA_SELECTOR)
    sregs.cs = code
    sregs.ds = data
    sregs.es = data
    sregs.fs = data
    sregs.gs = data
    sregs.ss = data
    sregs.tr = _segment_from_gdt(GDT_TSS, TSS_SELECTOR)
    sregs.gdt.base = layout.GDT_ADDR
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base = layout.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA


def boot_regs(entry: int) -> abi.Regs:
    return abi.Regs(
        rip=entry,
        rsp=layout.BOOT_STACK_POINTER,
        rbp=layout.BOOT_STACK_POINTER,
        rsi=layout.ZERO_PAGE_ADDR,
        rflags=0x2,
    )


def configure_fpu(fpu: abi.Fpu) -> None:
    fpu.fcw = FPU_CONTROL_WORD
    fpu.mxcsr = MXCSR_DEFAULT


def boot_msrs() -> list[tuple[int, int]]:
    zeroed = (
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_STAR,
        MSR_CSTAR,
        MSR_KERNEL_GS_BASE,
        MSR_SYSCALL_MASK,
        MSR_LSTAR,
        MSR_IA32_TSC,
    )
    return [(msr, 0) for msr in zeroed] + [(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING)]


def configure_lapic(lapic: abi.LapicState) -> None:
    """LINT0 as ExtINT (the 8259 path) and LINT1 as NMI, as a BIOS leaves them."""
    regs = memoryview(lapic).cast("B")
    for offset, mode in (
        (abi.APIC_LVT0, abi.APIC_DELIVERY_MODE_EXTINT),
        (abi.APIC_LVT1, abi.APIC_DELIVERY_MODE_NMI),
    ):
        (value,) = struct.unpack_from("<I", regs, offset)
        struct.pack_into("<I", regs, offset, (value & ~0x700) | (mode << 8))
