"""One image's pages as a loader places them, each with its class, its bytes and the
ELF sections and symbols it holds.

The classes follow exactly what :meth:`dksm.memory.guest_memory.GuestMemory.load_image`
does with a page, so that counting them predicts what loading costs:

``shareable``
    a whole page of file bytes inside a read-only segment
    (:func:`dksm.loader.segment.shareable_span`): mapped from the page pool.
``partial``
    a page holding read-only file bytes that is not shareable (the segment starts
    or its file bytes end inside it): copied into the guest's private RAM.
``writable``
    a page whose file bytes all come from writable segments: copied.
``zero-fill``
    a page holding only the zero-filled tail of a segment (``.bss``): not touched
    at load, so it costs nothing until the guest writes it.

The first three together are the *loaded* pages: every one of them is written at
load time when nothing is shared (dedup mode ``none``).

Segments come from :func:`dksm.loader.elf.load_elf`, so a malformed image fails
here with the loader's own :class:`~dksm.loader.segment.LoaderError`.  Sections and
symbols come from pyelftools; they only label pages, so an image whose section
headers cannot be read is still analysed, with a note saying so.
"""

from __future__ import annotations

import enum
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dksm.loader.elf import load_elf
from dksm.loader.segment import PAGE_SIZE, KernelImage, shareable_span

ZERO_PAGE = bytes(PAGE_SIZE)


class PageClass(enum.Enum):
    """What loading does with a page (see the module docstring)."""

    SHAREABLE = "shareable"
    PARTIAL = "partial"
    WRITABLE = "writable"
    ZERO_FILL = "zero-fill"

    @property
    def loaded(self) -> bool:
        return self is not PageClass.ZERO_FILL


@dataclass(frozen=True)
class Section:
    """An allocated ELF section, at its guest-physical address."""

    name: str
    addr: int
    size: int
    writable: bool
    executable: bool
    nobits: bool

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class Symbol:
    """A function or data object with a size, at its guest-physical address."""

    name: str
    addr: int
    size: int
    kind: str  # "func" or "object"

    @property
    def end(self) -> int:
        return self.addr + self.size


@dataclass(frozen=True)
class Page:
    """One guest page an image occupies.

    ``content`` is the page as loaded (file bytes in place, zeros elsewhere); it is
    None for zero-fill pages, which loading never touches.
    """

    addr: int
    cls: PageClass
    content: bytes | None
    sections: tuple[str, ...]

    @property
    def is_zero(self) -> bool:
        return self.content is None or self.content == ZERO_PAGE


@dataclass(frozen=True)
class ImagePages:
    """An image, its pages by address, and what labels them."""

    label: str
    path: str
    image: KernelImage
    pages: tuple[Page, ...]
    sections: tuple[Section, ...]
    symbols: tuple[Symbol, ...]  # sorted by address
    notes: tuple[str, ...] = ()

    def count(self, cls: PageClass) -> int:
        return sum(1 for p in self.pages if p.cls is cls)

    @property
    def loaded(self) -> list[Page]:
        return [p for p in self.pages if p.cls.loaded]

    @property
    def shareable(self) -> list[Page]:
        return [p for p in self.pages if p.cls is PageClass.SHAREABLE]

    def shareable_contents(self) -> set[bytes]:
        return {p.content for p in self.pages if p.cls is PageClass.SHAREABLE and p.content}

    def symbols_by_page(self) -> dict[int, list[tuple[Symbol, int]]]:
        """Page address -> the symbols overlapping that page, each with the number of
        its bytes inside the page, largest first."""
        found: dict[int, list[tuple[Symbol, int]]] = {}
        for sym in self.symbols:
            first = sym.addr & ~(PAGE_SIZE - 1)
            for page in range(first, sym.end, PAGE_SIZE):
                inside = min(sym.end, page + PAGE_SIZE) - max(sym.addr, page)
                found.setdefault(page, []).append((sym, inside))
        for entries in found.values():
            entries.sort(key=lambda e: (-e[1], e[0].addr))
        return found


@dataclass
class _PageBuild:
    content: bytearray | None = None
    readonly_bytes: bool = False
    writable_bytes: bool = False


def _page_range(start: int, end: int) -> range:
    return range(start & ~(PAGE_SIZE - 1), end, PAGE_SIZE)


def classify(image: KernelImage) -> dict[int, tuple[PageClass, bytes | None]]:
    """Every page an image's segments touch: address -> (class, loaded content)."""
    builds: dict[int, _PageBuild] = {}
    shareable: set[int] = set()
    for seg in image.segments:
        start, end = shareable_span(seg)
        shareable.update(range(start, end, PAGE_SIZE))
        for page in _page_range(seg.guest_addr, seg.end):
            build = builds.setdefault(page, _PageBuild())
            lo = max(page, seg.guest_addr)
            hi = min(page + PAGE_SIZE, seg.file_end)
            if hi <= lo:
                continue  # only zero-fill of this segment here
            if build.content is None:
                build.content = bytearray(PAGE_SIZE)
            build.content[lo - page : hi - page] = seg.data[
                lo - seg.guest_addr : hi - seg.guest_addr
            ]
            if seg.writable:
                build.writable_bytes = True
            else:
                build.readonly_bytes = True
    pages: dict[int, tuple[PageClass, bytes | None]] = {}
    for addr in sorted(builds):
        build = builds[addr]
        content = None if build.content is None else bytes(build.content)
        if addr in shareable:
            cls = PageClass.SHAREABLE
        elif build.readonly_bytes:
            cls = PageClass.PARTIAL
        elif build.writable_bytes:
            cls = PageClass.WRITABLE
        else:
            cls = PageClass.ZERO_FILL
        pages[addr] = (cls, content)
    return pages


def _physical(loads: list[tuple[int, int, int]], vaddr: int) -> int | None:
    """The guest-physical address of virtual address ``vaddr`` (None if unloaded)."""
    for start, end, paddr in loads:
        if start <= vaddr < end:
            return vaddr - start + paddr
    return None


def read_labels(data: bytes) -> tuple[list[Section], list[Symbol]]:
    """Allocated sections and sized FUNC/OBJECT symbols, at guest-physical addresses.

    ELF sections and symbols carry virtual addresses; the loader places segments at
    ``p_paddr``, so each address is moved by its segment's ``p_paddr - p_vaddr``.
    """
    from elftools.elf.constants import SH_FLAGS
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    elf = ELFFile(io.BytesIO(data))
    loads = [
        (seg["p_vaddr"], seg["p_vaddr"] + seg["p_memsz"], seg["p_paddr"])
        for seg in elf.iter_segments()
        if seg["p_type"] == "PT_LOAD"
    ]
    sections: list[Section] = []
    symbols: list[Symbol] = []
    for sec in elf.iter_sections():
        flags = sec["sh_flags"]
        if isinstance(sec, SymbolTableSection):
            for sym in sec.iter_symbols():
                kind = sym["st_info"]["type"]
                if kind not in ("STT_FUNC", "STT_OBJECT") or sym["st_size"] <= 0:
                    continue
                if sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS") or not sym.name:
                    continue
                addr = _physical(loads, sym["st_value"])
                if addr is not None:
                    symbols.append(
                        Symbol(
                            sym.name,
                            addr,
                            sym["st_size"],
                            "func" if kind == "STT_FUNC" else "object",
                        )
                    )
            continue
        if not flags & SH_FLAGS.SHF_ALLOC or sec["sh_size"] == 0:
            continue
        addr = _physical(loads, sec["sh_addr"])
        if addr is None:
            continue
        sections.append(
            Section(
                name=sec.name,
                addr=addr,
                size=sec["sh_size"],
                writable=bool(flags & SH_FLAGS.SHF_WRITE),
                executable=bool(flags & SH_FLAGS.SHF_EXECINSTR),
                nobits=sec["sh_type"] == "SHT_NOBITS",
            )
        )
    sections.sort(key=lambda s: s.addr)
    symbols.sort(key=lambda s: (s.addr, s.name))
    return sections, symbols


def _sections_of(page: int, sections: Iterable[Section]) -> tuple[str, ...]:
    return tuple(s.name for s in sections if s.addr < page + PAGE_SIZE and s.end > page)


def read_image(path: Path, mem_size: int, label: str | None = None) -> ImagePages:
    """Load ``path`` with the loader's checks and classify and label its pages."""
    image = load_elf(str(path), mem_size)
    notes: list[str] = []
    sections: list[Section] = []
    symbols: list[Symbol] = []
    try:
        data = path.read_bytes()
        sections, symbols = read_labels(data)
    except Exception as exc:  # labels are optional: any parse failure only costs them
        notes.append(f"sections and symbols unreadable ({type(exc).__name__}: {exc})")
    if not symbols and not notes:
        notes.append("no function or object symbols: pages are labelled by section only")
    pages = tuple(
        Page(addr, cls, content, _sections_of(addr, sections))
        for addr, (cls, content) in classify(image).items()
    )
    return ImagePages(
        label=label or path.stem,
        path=str(path),
        image=image,
        pages=pages,
        sections=tuple(sections),
        symbols=tuple(symbols),
        notes=tuple(notes),
    )


def unique_labels(paths: Iterable[Path]) -> list[str]:
    """Short names for images: the file stem, or more of the path where stems clash
    (``naive/hello`` beside ``images/hello``)."""
    paths = list(paths)
    depth = 1
    while True:
        labels = ["/".join(p.with_suffix("").parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or all(depth >= len(p.parts) for p in paths):
            break
        depth += 1
    # The same file named twice: number the repeats.
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label}#{seen[label]}"
    return labels
