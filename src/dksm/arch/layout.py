"""Guest-physical layout of a dksm microVM, each address with where it comes from.

The numbers are Firecracker's x86-64 layout (``arch/x86_64/layout.rs`` and
``regs.rs``), which Unikraft's Firecracker platform and Linux's 64-bit boot protocol
expect; docs/BOOT.md lists them.  No other module writes a bare guest address.
"""

PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30

# Boot GDT: null, code, data, TSS descriptors (8 bytes each).
GDT_ADDR = 0x500
# Boot IDT: a single zero entry; the guest installs its own before enabling interrupts.
IDT_ADDR = 0x520
# The Linux zero page (struct boot_params); RSI points here at entry.
ZERO_PAGE_ADDR = 0x7000
# Initial stack and frame pointer (top of the page below the page tables).
BOOT_STACK_POINTER = 0x8FF0
# Identity map of the first GiB with 2 MiB pages: PML4, PDPT, PD.
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
# The kernel command line, NUL-terminated.  Its size is Linux's x86
# COMMAND_LINE_SIZE, which Firecracker also enforces.
CMDLINE_ADDR = 0x20000
CMDLINE_MAX_SIZE = 2048
# Start of the EBDA / MP table area: conventional RAM ends here.
EBDA_START = 0x9FC00
# The MP table (floating pointer first), where guests scan for it: the EBDA's first KiB.
MP_TABLE_ADDR = EBDA_START
# End of conventional memory (640 KiB): the legacy video window starts here.
EBDA_END = 0xA0000
# Kernels load at or above 1 MiB ("high memory").
HIMEM_START = 0x100000
# Firecracker 1.x's 32-bit MMIO gap: guest RAM never overlaps it.
MMIO_GAP_START = 0xD000_0000
MMIO_GAP_END = 1 << 32
# virtio-mmio devices: one 4 KiB register window each, from the start of the MMIO gap
# upwards, in the order they are attached (Firecracker's MMIO_LEN and mmio_base).
VIRTIO_MMIO_BASE = MMIO_GAP_START
VIRTIO_MMIO_SIZE = 0x1000
# Interrupt lines for them: 0-4 belong to the legacy devices (PIT, keyboard, cascade,
# serial ports), and the IOAPIC has 24 pins (Firecracker's IRQ_BASE and IRQ_MAX).
VIRTIO_IRQ_BASE = 5
VIRTIO_IRQ_MAX = 23
VIRTIO_MAX_DEVICES = VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1
# KVM_SET_TSS_ADDR: three pages just below the 4 GiB boundary's BIOS area.
TSS_ADDR = 0xFFFBD000

# Everything below HIMEM_START that the VMM writes; an image must not load there.
BOOT_STRUCTURES_END = HIMEM_START

# Limits on guest RAM this VMM accepts.  The identity map covers 1 GiB, and RAM is
# a single KVM slot below the MMIO gap.
MIN_MEM_SIZE = 2 * MIB
MAX_MEM_SIZE = MMIO_GAP_START

E820_RAM = 1
E820_RESERVED = 2


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """The e820 table (address, size, type) for ``mem_size`` bytes of RAM at 0."""
    return [
        (0, EBDA_START, E820_RAM),
        (HIMEM_START, min(mem_size, MMIO_GAP_START) - HIMEM_START, E820_RAM),
    ]
