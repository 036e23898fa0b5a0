"""Guest page tables walked as the CPU walks them: linear to guest-physical addresses.

The emulator reads and writes guest memory by linear address; :class:`PageWalker`
translates through the guest's own 4- or 5-level tables (4 KiB, 2 MiB and 1 GiB
pages) with the CPU's permission checks, and sets accessed and dirty bits.  Walking
here costs no ioctl (``KVM_TRANSLATE`` would be one per page).  Facts from the Intel
SDM volume 3, chapter 4; no code from elsewhere.
"""

from __future__ import annotations

from dksm.value import Value
from dksm.x86emu.cpu import ExecutionError
from dksm.x86emu.registers import CR0_PG, CR0_WP, CR4_LA57, EFER_NXE, MASK64

# Page-table entry bits (SDM vol. 3, 4.5).
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_LARGE = 1 << 7
PTE_NO_EXECUTE = 1 << 63
PHYSICAL_MASK = 0x000F_FFFF_FFFF_F000
PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1


class PagingMode(Value):
    """The control registers a page walk depends on, and the CPL."""

    __slots__ = ("cpl", "cr0", "cr3", "cr4", "efer")

    def __init__(
        self,
        cr0: int,
        cr3: int,
        cr4: int,
        efer: int,
        cpl: int,
    ) -> None:
        self.cr0 = cr0
        self.cr3 = cr3
        self.cr4 = cr4
        self.efer = efer
        self.cpl = cpl


class PageWalker:
    """Linear to guest-physical translation through the guest's own page tables
    (4- or 5-level, 4 KiB, 2 MiB and 1 GiB pages), as the CPU does it: permission
    checks, and accessed and dirty bits set once the walk has succeeded."""

    def __init__(self, ram: memoryview) -> None:
        self._size = len(ram)
        self._words = ram.cast("B").cast("Q")  # page-table entries, by index

    def walk(self, address: int, mode: PagingMode, write: bool, fetch: bool = False) -> int:
        """The guest-physical address of the 4 KiB page holding ``address``."""
        cr0, cr4 = mode.cr0, mode.cr4
        if not cr0 & CR0_PG:
            return address & ~PAGE_MASK & MASK64
        la57 = bool(cr4 & CR4_LA57)
        top = 56 if la57 else 47
        if (address >> top) not in (0, (1 << (64 - top)) - 1):
            raise ExecutionError("#GP", f"non-canonical address {address:#x}")
        user = mode.cpl == 3
        check_write = write and (user or cr0 & CR0_WP)
        nx = bool(mode.efer & EFER_NXE)
        words = self._words
        table = mode.cr3 & PHYSICAL_MASK
        physical = 0
        updates: list[tuple[int, int]] = []
        for shift in (48, 39, 30, 21, 12) if la57 else (39, 30, 21, 12):
            slot = table + ((address >> shift) & 0x1FF) * 8
            if slot + 8 > self._size:
                raise ExecutionError("#PF", f"the page table for {address:#x} is not in RAM")
            entry = words[slot >> 3]
            if not entry & PTE_PRESENT:
                raise ExecutionError("#PF", f"linear address {address:#x} is not mapped")
            if check_write and not entry & PTE_WRITABLE:
                raise ExecutionError("#PF", f"linear address {address:#x} is read-only")
            if user and not entry & PTE_USER:
                raise ExecutionError("#PF", f"linear address {address:#x} is supervisor-only")
            if fetch and nx and entry & PTE_NO_EXECUTE:
                raise ExecutionError("#PF", f"linear address {address:#x} is not executable")
            leaf = shift == 12 or (shift in (21, 30) and entry & PTE_LARGE)
            wanted = entry | PTE_ACCESSED | (PTE_DIRTY if leaf and write else 0)
            if wanted != entry:
                updates.append((slot >> 3, wanted))
            if leaf:
                size = 1 << shift
                physical = (entry & PHYSICAL_MASK & ~(size - 1)) | (address & (size - 1))
                break
            table = entry & PHYSICAL_MASK
        for index, value in updates:
            words[index] = value
        return physical & ~PAGE_MASK


def page_pieces(address: int, size: int) -> list[tuple[int, int]]:
    """Split [address, address + size) at page boundaries: (start, length) pieces."""
    pieces = []
    while size > 0:
        length = min(size, PAGE_SIZE - (address & PAGE_MASK))
        pieces.append((address, length))
        address = (address + length) & MASK64
        size -= length
    return pieces
