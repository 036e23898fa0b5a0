"""What a loaded image is made of: segments and an entry point."""

from __future__ import annotations

from dksm.error import DksmError
from dksm.value import Value

PAGE_SIZE = 4096


class LoaderError(DksmError):
    """The image is malformed or does not fit the guest; the message says how."""


class Segment(Value):
    """One loadable piece of an image, at a guest-physical address.

    ``data`` is what the file holds (``p_filesz`` bytes); the rest of ``mem_size`` is
    zero-fill.  ``writable`` is false for segments the guest only reads (ELF
    ``PT_LOAD`` without ``PF_W``): their whole pages are what the pool may share.
    """

    __slots__ = ("data", "executable", "guest_addr", "mem_size", "writable")

    def __init__(
        self,
        guest_addr: int,
        data: bytes,
        mem_size: int,
        writable: bool,
        executable: bool = False,
    ) -> None:
        self.guest_addr = guest_addr
        self.data = data
        self.mem_size = mem_size
        self.writable = writable
        self.executable = executable

    @property
    def end(self) -> int:
        return self.guest_addr + self.mem_size

    @property
    def file_end(self) -> int:
        return self.guest_addr + len(self.data)


class KernelImage(Value):
    """A parsed image: its segments (sorted by address) and its 64-bit entry point."""

    __slots__ = ("entry", "path", "segments")

    def __init__(
        self,
        path: str,
        segments: tuple[Segment, ...],
        entry: int,
    ) -> None:
        self.path = path
        self.segments = segments
        self.entry = entry

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def shareable_span(segment: Segment) -> tuple[int, int]:
    """The page-aligned guest range of ``segment`` that may come from the page pool.

    The rule the whole project uses (loader, pool, analysis): only whole pages of
    file bytes in a read-only segment.  Partial pages at either end are copied, the
    zero-fill tail is left to fresh zero pages, and writable segments are copied.
    Segments never overlap, so a whole page inside a read-only segment is never
    shared with a writable one.  Returns an empty span ``(x, x)`` when nothing fits.
    """
    if segment.writable:
        return (segment.guest_addr, segment.guest_addr)
    start = (segment.guest_addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    end = segment.file_end & ~(PAGE_SIZE - 1)
    return (start, end) if end > start else (start, start)
