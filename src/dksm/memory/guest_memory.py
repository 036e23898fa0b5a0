"""Guest RAM: one private anonymous mapping, and how an image's segments enter it.

RAM is mapped with ``MAP_NORESERVE`` so that a guest pays only for the pages it
touches, between two guard pages so that it is a mapping of its own
(:func:`dksm.memory.host_mapping.map_guarded`).  Writable segments are copied in;
read-only pages may instead be handed to a :class:`PageSharer` (the page pool),
which replaces that part of the mapping with copy-on-write views of shared
frames.  KVM sees one memory slot either way.
"""

from __future__ import annotations

from dksm.loader.segment import shareable_span
from dksm.memory import host_mapping

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Protocol

    from dksm.loader.segment import KernelImage, Segment

    class SharedPages(Protocol):
        """What a sharer reports about one request."""

        @property
        def mapped(self) -> bool: ...

    class PageSharer(Protocol):
        """Something that can map given page contents at a host address, shared.

        ``content`` is a whole number of pages.  If the result says ``mapped`` the pages
        at ``address`` now show ``content``; otherwise nothing changed and the caller
        copies the bytes itself.
        """

        def map_pages(self, address: int, content: bytes | memoryview) -> SharedPages: ...


class GuestMemory:
    """``size`` bytes of guest-physical RAM starting at guest address 0."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.host_address = host_mapping.map_guarded(size)
        try:
            self.ram: memoryview | None = host_mapping.view(self.host_address, size)
        except BaseException:
            host_mapping.unmap_guarded(self.host_address, size)
            raise
        self.pages_shared = 0
        # Guest ranges of the image's code (read-only executable segments), whole pages.
        self.code_ranges: list[tuple[int, int]] = []
        # Guest ranges [start, end) mapped from the page pool at load time.
        self.shared_spans: list[tuple[int, int]] = []

    def view(self) -> memoryview:
        if self.ram is None:
            raise ValueError("guest memory is closed")
        return self.ram

    def write(self, guest_addr: int, data: bytes | memoryview) -> None:
        self.view()[guest_addr : guest_addr + len(data)] = data

    def read(self, guest_addr: int, length: int) -> bytes:
        return bytes(self.view()[guest_addr : guest_addr + length])

    def load_image(self, image: KernelImage, sharer: PageSharer | None = None) -> None:
        """Place every segment; whole read-only pages go through ``sharer`` if given."""
        for segment in image.segments:
            self.load_segment(segment, sharer)

    def load_segment(self, segment: Segment, sharer: PageSharer | None = None) -> None:
        """Place one segment (an image's, or the initrd); its whole read-only pages go
        through ``sharer`` if given."""
        page = host_mapping.PAGE_SIZE
        if segment.executable and not segment.writable:
            first = segment.guest_addr & ~(page - 1)
            self.code_ranges.append((first, min(-(-segment.end // page) * page, self.size)))
        start, end = shareable_span(segment)
        if sharer is not None and end > start:
            lo = start - segment.guest_addr
            hi = end - segment.guest_addr
            content = memoryview(segment.data)[lo:hi]
            if sharer.map_pages(self.host_address + start, content).mapped:
                self.pages_shared += (end - start) // page
                self.shared_spans.append((start, end))
                self.write(segment.guest_addr, segment.data[:lo])
                self.write(end, segment.data[hi:])
                return
        self.write(segment.guest_addr, segment.data)

    def advise_mergeable(self, *, code_only: bool = False) -> None:
        """Offer all of RAM to Linux KSM (``MADV_MERGEABLE``), as QEMU and Cloud
        Hypervisor do for their guests; ksmd then scans it in the background.  With
        ``code_only``, only the pages of the image's code, as the DKSM thesis's
        modified Firecracker advised (call after :meth:`load_image`)."""
        if not code_only:
            host_mapping.advise(self.host_address, self.size, host_mapping.MADV_MERGEABLE)
            return
        for start, end in self.code_ranges:
            host_mapping.advise(self.host_address + start, end - start, host_mapping.MADV_MERGEABLE)

    def close(self) -> None:
        if self.ram is not None:
            self.ram.release()
            self.ram = None
            host_mapping.unmap_guarded(self.host_address, self.size)
