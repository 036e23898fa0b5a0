"""Why a Linux kernel's read-only pages stop being shared: its boot-time patching.

Linux rewrites its own code while it boots: alternatives, paravirt call sites,
retpoline and return-thunk sites, lock prefixes on a uniprocessor, ftrace's
mcount sites, jump labels and static calls; and it writes its
``__ro_after_init`` data, which the x86 linker script places inside ``.rodata``
(with the jump-label table and static-call sites it sorts).  Each write to a
page mapped copy-on-write from the pool gives the guest a private copy, even
when the bytes written are the ones already there.

This module says, for a page the guest copied, which of those mechanisms wrote
it, from the kernel's own section information (a Debian kernel ships no symbols:
its ``System.map`` is a placeholder):

- ``.smp_locks``, ``.retpoline_sites``, ``.return_sites``: 32-bit offsets, each
  relative to its own entry, of the patched instruction;
- ``.altinstructions``: ``struct alt_instr`` (s32 instr_offset, s32 repl_offset,
  u16 cpuid, u8 instrlen, u8 replacementlen; 12 bytes);
- ``.parainstructions``: ``struct paravirt_patch_site`` (u64 address, u8 type,
  u8 len; 16 bytes);
- ftrace's ``__mcount_loc`` has no section header (it lies in ``.init.data``): it
  is found as the longest ascending run of 8-byte pointers into ``.text`` that
  each point at a 5-byte NOP or a call (the mcount sites as built).

Changes the sites do not explain are named by what they look like: a jump
turned into a NOP or back (jump labels), a call or jump whose target moved
(static calls), other code, or data in ``.rodata``.  Facts from the kernel's
``arch/x86/kernel/alternative.c`` and ``include/asm-generic/vmlinux.lds.h``
(6.1); the layouts are checked against the image (entry counts that divide
evenly, offsets that land in ``.text``).
"""

from __future__ import annotations

import bisect
import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

PAGE_SIZE = 4096

SMP_LOCKS = "lock prefixes (uniprocessor)"
ALTERNATIVES = "alternatives"
PARAVIRT = "paravirt"
RETPOLINES = "retpolines"
RETURN_THUNKS = "return thunks"
FTRACE = "ftrace (mcount sites)"
JUMP_LABELS = "jump labels"
STATIC_CALLS = "static calls"
OTHER_TEXT = "other code"
RODATA = "__ro_after_init data (.rodata)"
UNCHANGED = "rewritten with the same bytes"
# Priority when several explain one change.
MECHANISMS = (SMP_LOCKS, ALTERNATIVES, PARAVIRT, RETPOLINES, RETURN_THUNKS, FTRACE)

ALT_INSTR = struct.Struct("<iiHBB")
PARAVIRT_SITE = struct.Struct("<QBB6x")
S32 = struct.Struct("<i")
RETPOLINE_SITE_LENGTH = 6  # call/jmp rel32 to a thunk, or jcc rel32
RETURN_SITE_LENGTH = 5  # jmp rel32 to the return thunk
CALL_OR_JMP_LENGTH = 5
NOP5 = b"\x0f\x1f\x44\x00\x00"
CALL_REL32 = 0xE8
JMP_REL32 = 0xE9
JMP_REL8 = 0xEB
MIN_MCOUNT_RUN = 1000


@dataclass(frozen=True)
class KernelLayout:
    """Where the kernel's code, read-only data and patch sites lie (guest-physical)."""

    text: tuple[int, int]
    rodata: tuple[int, int]
    sites: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # sorted ranges

    def site_at(self, start: int, end: int) -> str | None:
        """The first mechanism (by priority) with a site overlapping [start, end)."""
        for name in MECHANISMS:
            ranges = self.sites.get(name, [])
            i = bisect.bisect_right(ranges, (start, 1 << 64)) - 1
            for j in (i, i + 1):
                if 0 <= j < len(ranges) and ranges[j][0] < end and start < ranges[j][1]:
                    return name
        return None


def _sections(data: bytes) -> tuple[dict[str, tuple[int, int, bytes]], list[tuple[int, int, int]]]:
    """name -> (vaddr, size, bytes) of each section; the PT_LOAD (vaddr, paddr, memsz)."""
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(data))
    sections = {}
    for section in elf.iter_sections():
        if section["sh_type"] == "SHT_NOBITS" or not section["sh_addr"]:
            continue
        sections[section.name] = (section["sh_addr"], section["sh_size"], section.data())
    loads = [
        (seg["p_vaddr"], seg["p_paddr"], seg["p_memsz"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD"
    ]
    return sections, loads


def _physical(loads: list[tuple[int, int, int]], vaddr: int) -> int | None:
    for start, paddr, size in loads:
        if start <= vaddr < start + size:
            return paddr + vaddr - start
    return None


def _relative_sites(vaddr: int, raw: bytes, length: int) -> list[tuple[int, int]]:
    out = []
    for i in range(len(raw) // S32.size):
        (offset,) = S32.unpack_from(raw, i * S32.size)
        site = vaddr + i * S32.size + offset
        out.append((site, site + length))
    return out


def _mcount_sites(
    sections: dict[str, tuple[int, int, bytes]], text: tuple[int, int, bytes]
) -> list[tuple[int, int]]:
    """The longest ascending run of pointers to mcount sites as built, in init data."""
    text_start, text_size, code = text
    best: list[int] = []
    for name in (".init.data", ".data", ".rodata"):
        if name not in sections:
            continue
        _, _, raw = sections[name]
        run: list[int] = []
        for i in range(0, len(raw) - 7, 8):
            (value,) = struct.unpack_from("<Q", raw, i)
            at = value - text_start
            good = 0 <= at < text_size - 5 and (code[at : at + 5] == NOP5 or code[at] == CALL_REL32)
            if good and (not run or value > run[-1]):
                run.append(value)
                continue
            if len(run) > len(best):
                best = run
            run = [value] if good else []
        if len(run) > len(best):
            best = run
    if len(best) < MIN_MCOUNT_RUN:
        return []
    return [(site, site + CALL_OR_JMP_LENGTH) for site in best]


def kernel_layout(vmlinux: bytes) -> KernelLayout:
    """The code, read-only data and patch sites of the kernel ELF ``vmlinux``."""
    sections, loads = _sections(vmlinux)

    def physical_range(name: str) -> tuple[int, int]:
        vaddr, size, _ = sections[name]
        paddr = _physical(loads, vaddr)
        if paddr is None:
            return (0, 0)
        return (paddr, paddr + size)

    virtual: dict[str, list[tuple[int, int]]] = {}
    if ".smp_locks" in sections:
        vaddr, _, raw = sections[".smp_locks"]
        virtual[SMP_LOCKS] = _relative_sites(vaddr, raw, 1)
    if ".retpoline_sites" in sections:
        vaddr, _, raw = sections[".retpoline_sites"]
        virtual[RETPOLINES] = _relative_sites(vaddr, raw, RETPOLINE_SITE_LENGTH)
    if ".return_sites" in sections:
        vaddr, _, raw = sections[".return_sites"]
        virtual[RETURN_THUNKS] = _relative_sites(vaddr, raw, RETURN_SITE_LENGTH)
    if ".altinstructions" in sections:
        vaddr, size, raw = sections[".altinstructions"]
        if size % ALT_INSTR.size == 0:
            alternatives = []
            for i in range(size // ALT_INSTR.size):
                offset, _, _, length, _ = ALT_INSTR.unpack_from(raw, i * ALT_INSTR.size)
                site = vaddr + i * ALT_INSTR.size + offset
                alternatives.append((site, site + length))
            virtual[ALTERNATIVES] = alternatives
    if ".parainstructions" in sections:
        vaddr, size, raw = sections[".parainstructions"]
        if size % PARAVIRT_SITE.size == 0:
            virtual[PARAVIRT] = [
                (address, address + length)
                for address, _, length in (
                    PARAVIRT_SITE.unpack_from(raw, i * PARAVIRT_SITE.size)
                    for i in range(size // PARAVIRT_SITE.size)
                )
            ]
    if ".text" in sections:
        virtual[FTRACE] = _mcount_sites(sections, sections[".text"])
    sites: dict[str, list[tuple[int, int]]] = {}
    for name, ranges in virtual.items():
        physical = []
        for start, end in ranges:
            paddr = _physical(loads, start)
            if paddr is not None:
                physical.append((paddr, paddr + end - start))
        sites[name] = sorted(physical)
    return KernelLayout(
        text=physical_range(".text") if ".text" in sections else (0, 0),
        rodata=physical_range(".rodata") if ".rodata" in sections else (0, 0),
        sites=sites,
    )


def _changed_runs(before: bytes, after: bytes) -> list[tuple[int, int]]:
    """[start, end) offsets of the runs of bytes that differ."""
    runs = []
    i = 0
    n = len(before)
    while i < n:
        if before[i] == after[i]:
            i += 1
            continue
        j = i
        while j < n and before[j] != after[j]:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def _looks_like(before: bytes, after: bytes, start: int, end: int) -> str:
    """Name a code change no site explains, by the instructions on both sides."""
    window = range(max(0, start - 4), start + 1)
    for at in window:
        old, new = before[at : at + 5], after[at : at + 5]
        if at + 5 < end:
            continue
        kinds = {old[:1], new[:1]}
        if old[:1] in (bytes([CALL_REL32]), bytes([JMP_REL32])) and new[:1] == old[:1]:
            return STATIC_CALLS
        if kinds & {bytes([JMP_REL32]), bytes([JMP_REL8])} and (
            NOP5 in (old, new) or b"\x66\x90" in (old[:2], new[:2])
        ):
            return JUMP_LABELS
    return OTHER_TEXT


@dataclass
class PageChange:
    """What happened to one copied page: the mechanisms that changed its bytes."""

    address: int
    mechanisms: dict[str, int]  # mechanism -> bytes changed

    @property
    def primary(self) -> str:
        if not self.mechanisms:
            return UNCHANGED
        return max(self.mechanisms.items(), key=lambda kv: kv[1])[0]


def explain_page(layout: KernelLayout, address: int, before: bytes, after: bytes) -> PageChange:
    """Which mechanisms changed the page at guest-physical ``address``."""
    change = PageChange(address, {})
    text_start, text_end = layout.text
    for start, end in _changed_runs(before, after):
        where = address + start
        name = layout.site_at(where, address + end)
        if name is None:
            if text_start <= where < text_end:
                name = _looks_like(before, after, start, end)
            else:
                name = RODATA
        change.mechanisms[name] = change.mechanisms.get(name, 0) + end - start
    return change


@dataclass
class PatchReport:
    """Copied pages of a kernel, summed by the mechanism that changed them most."""

    pages: int = 0
    by_primary: dict[str, int] = field(default_factory=dict)
    pages_touched: dict[str, int] = field(default_factory=dict)
    bytes_changed: dict[str, int] = field(default_factory=dict)

    def add(self, change: PageChange) -> None:
        self.pages += 1
        primary = change.primary
        self.by_primary[primary] = self.by_primary.get(primary, 0) + 1
        for name, count in change.mechanisms.items():
            self.pages_touched[name] = self.pages_touched.get(name, 0) + 1
            self.bytes_changed[name] = self.bytes_changed.get(name, 0) + count

    def to_json(self) -> dict[str, object]:
        return {
            "pages": self.pages,
            "by_primary": dict(sorted(self.by_primary.items(), key=lambda kv: -kv[1])),
            "pages_touched": dict(sorted(self.pages_touched.items(), key=lambda kv: -kv[1])),
            "bytes_changed": dict(sorted(self.bytes_changed.items(), key=lambda kv: -kv[1])),
        }


def explain_pages(layout: KernelLayout, pages: Iterable[tuple[int, bytes, bytes]]) -> PatchReport:
    """Sum :func:`explain_page` over (address, before, after) of copied pages."""
    report = PatchReport()
    for address, before, after in pages:
        report.add(explain_page(layout, address, before, after))
    return report
