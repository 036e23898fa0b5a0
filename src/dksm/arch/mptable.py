"""The Intel MultiProcessor Specification 1.4 table: how the guest learns its CPUs.

Firecracker describes an x86 VM's processors and interrupt wiring with an MP table
in the last KiB of conventional memory (0x9fc00, the EBDA area that e820 leaves out
of RAM), where Linux and unikernels scan for the ``_MP_`` floating pointer.  The
table lists one enabled processor per vCPU (APIC id = vCPU index, the first is the
bootstrap processor), an ISA bus, the in-kernel IOAPIC (its id just above the
CPUs'), ISA IRQs 0-23 routed 1:1 to the IOAPIC's pins as KVM's default routing does,
and the local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of every CPU.

Layouts and values from the MP specification 1.4, chapter 4.
"""

from __future__ import annotations

import struct

from dksm.arch import layout

FLOATING_POINTER = struct.Struct("<4sIBBBB4s")  # signature, table, length/16, spec, sum, features
TABLE_HEADER = struct.Struct("<4sHBB8s12sIHHII")
PROCESSOR = struct.Struct("<BBBBII8x")
BUS = struct.Struct("<BB6s")
IOAPIC = struct.Struct("<BBBBI")
INTERRUPT = struct.Struct("<BBHBBBB")  # I/O and local interrupt entries share it

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

SPEC_REVISION = 4  # 1.4
CPU_ENABLED = 0x01
CPU_BOOTSTRAP = 0x02
IOAPIC_USABLE = 0x01
INTERRUPT_VECTORED = 0  # "INT"
INTERRUPT_NMI = 1
INTERRUPT_EXTINT = 3
POLARITY_TRIGGER_BUS_DEFAULT = 0
ALL_LOCAL_APICS = 0xFF

LAPIC_VERSION = 0x14  # an integrated xAPIC
CPU_SIGNATURE = 0x600  # family 6: what the guest would see before reading CPUID
CPU_FEATURES_FPU_APIC = 0x201
IOAPIC_ADDRESS = 0xFEC0_0000
LAPIC_ADDRESS = 0xFEE0_0000
ISA_IRQS = 24  # the in-kernel IOAPIC's pins

OEM_ID = b"DKSM    "
PRODUCT_ID = b"microVM     "

#: The most vCPUs whose table fits in the kilobyte below 640 KiB.
MAX_CPUS = 32


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` plus it sum to zero modulo 256."""
    return -sum(data) & 0xFF


def mp_table(cpu_count: int, base: int = layout.MP_TABLE_ADDR) -> bytes:
    """The floating pointer followed by the configuration table, to be placed at ``base``."""
    if not 1 <= cpu_count <= MAX_CPUS:
        raise ValueError(f"an MP table describes 1 to {MAX_CPUS} CPUs, not {cpu_count}")
    ioapic_id = cpu_count
    entries = bytearray()
    for cpu in range(cpu_count):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
        entries += PROCESSOR.pack(
            ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES_FPU_APIC
        )
    entries += BUS.pack(ENTRY_BUS, 0, b"ISA   ")
    entries += IOAPIC.pack(ENTRY_IOAPIC, ioapic_id, LAPIC_VERSION, IOAPIC_USABLE, IOAPIC_ADDRESS)
    for irq in range(ISA_IRQS):
        entries += INTERRUPT.pack(
            ENTRY_IO_INTERRUPT, INTERRUPT_VECTORED, POLARITY_TRIGGER_BUS_DEFAULT, 0, irq,
            ioapic_id, irq,
        )  # fmt: skip
    entries += INTERRUPT.pack(
        ENTRY_LOCAL_INTERRUPT, INTERRUPT_EXTINT, POLARITY_TRIGGER_BUS_DEFAULT, 0, 0, 0, 0
    )
    entries += INTERRUPT.pack(
        ENTRY_LOCAL_INTERRUPT, INTERRUPT_NMI, POLARITY_TRIGGER_BUS_DEFAULT, 0, 0,
        ALL_LOCAL_APICS, 1,
    )  # fmt: skip
    table_address = base + FLOATING_POINTER.size
    length = TABLE_HEADER.size + len(entries)
    header = bytearray(
        TABLE_HEADER.pack(
            b"PCMP", length, SPEC_REVISION, 0, OEM_ID, PRODUCT_ID, 0, 0,
            cpu_count + 1 + 1 + ISA_IRQS + 2, LAPIC_ADDRESS, 0,
        )
    )  # fmt: skip
    header[7] = _checksum(header + entries)
    pointer = bytearray(
        FLOATING_POINTER.pack(b"_MP_", table_address, 1, SPEC_REVISION, 0, 0, bytes(4))
    )
    pointer[10] = _checksum(pointer)
    table = bytes(pointer + header + entries)
    if base + len(table) > layout.EBDA_END:
        raise ValueError(f"an MP table for {cpu_count} CPUs does not fit below 640 KiB")
    return table
