"""Mapping pool pages: the part of the pool a process needs to *use* pages that are
already referenced for it, without opening the index.

:func:`map_slots` maps slots of the pages file copy-on-write over a caller's memory,
one ``mmap`` per run of consecutive slots.  :class:`SlotMapper` does it for a VM
whose pages a launcher referenced in advance (see
:meth:`dksm.dedup.pool.PagePool.hand_over`): a forked child then maps its pool pages
with nothing but ``mmap`` calls.  The invariants that make this safe are the pool's
(``dksm.dedup.pool``): references first, mappings after.
"""

from __future__ import annotations

import array
import itertools
import operator
from collections.abc import Sequence

from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE, HostMappingError, map_file_private_fixed
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.dedup.index import ManifestRecord


class MappingError(DksmError):
    """Pool pages could not be mapped into the caller's memory."""


class MergeResult(Value):
    """What one :meth:`Lease.map_pages` or :meth:`Lease.merge` call did."""

    __slots__ = ("mapped", "mmaps", "pages", "pages_merged", "pages_new")

    def __init__(
        self,
        # pages offered
        pages: int,
        # pages that matched a page already in the pool
        pages_merged: int,
        # pages stored in new slots
        pages_new: int,
        # False: the run switch is off and nothing was mapped
        mapped: bool,
        # mmap calls made (one per run of consecutive slots)
        mmaps: int = 0,
    ) -> None:
        self.pages = pages
        self.pages_merged = pages_merged
        self.pages_new = pages_new
        self.mapped = mapped
        self.mmaps = mmaps


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first slot, length, first page) of each run of consecutive slots."""
    count = len(slots)
    # An image stored at its first load is one run: checked in C, not page by page.
    if count and slots[-1] - slots[0] == count - 1:
        whole = array.array("q", range(slots[0], slots[0] + count))
        if (slots if isinstance(slots, array.array) else array.array("q", slots)) == whole:
            return [(slots[0], count, 0)]
    # Pages in consecutive slots share ``slot - page``: grouped on it in C, so the
    # Python work is per run, not per page.
    found: list[tuple[int, int, int]] = []
    page = 0
    for offset, run in itertools.groupby(map(operator.sub, slots, itertools.count())):
        length = len(list(run))
        found.append((offset + page, length, page))
        page += length
    return found


def map_slots(
    pages_fd: int,
    address: int,
    slots: Sequence[int],
    runs: list[tuple[int, int, int]] | None = None,
) -> int:
    """Map each page's slot over ``address``: one mmap per run of consecutive slots
    (``runs``, as :func:`slot_runs` gives them, when the caller knows them)."""
    if runs is None:
        runs = slot_runs(slots)
    for first, length, page in runs:
        try:
            map_file_private_fixed(
                address + page * PAGE_SIZE, length * PAGE_SIZE, pages_fd, first * PAGE_SIZE
            )
        except HostMappingError as error:
            raise MappingError(
                f"cannot map pool pages at {address + page * PAGE_SIZE:#x}: {error} "
                "(the lease keeps its references until released)"
            ) from error
    return len(runs)


class ReferencedPages(Value):
    """Pages referenced under a lease but not mapped yet: which slot holds each."""

    __slots__ = ("manifest", "pages_new", "slots")

    def __init__(
        self,
        slots: Sequence[int],
        pages_new: int,
        # the manifest they were referenced through
        manifest: ManifestRecord | None = None,
    ) -> None:
        self.slots = slots
        self.pages_new = pages_new
        self.manifest = manifest


class SlotMapper:
    """Maps already-referenced pages for a process that never opens the index.

    Built by a launcher from :meth:`Lease.reference_pages` results keyed by the
    content they were made from; used (after :meth:`PagePool.hand_over`) as the
    page sharer of a VM, so a forked child maps pool pages with nothing but
    ``mmap`` calls: no LMDB, no hashing, no private copy of the pool's code paths.
    """

    def __init__(self, pages_fd: int, by_content: dict[bytes, ReferencedPages]) -> None:
        self.pages_fd = pages_fd
        self.by_content = by_content

    def map_pages(self, address: int, content: bytes | bytearray | memoryview) -> MergeResult:
        view = memoryview(content)
        # A read-only memoryview hashes and compares like the bytes it shows, so the
        # lookup copies nothing (a copy would be private memory in every child).
        key = view if view.readonly else bytes(view)
        referenced = self.by_content.get(key)  # type: ignore[arg-type]
        if referenced is None:  # not referenced for this process: it must copy
            return MergeResult(len(content) // PAGE_SIZE, 0, 0, False, 0)
        mmaps = map_slots(self.pages_fd, address, referenced.slots)
        count = len(referenced.slots)
        return MergeResult(count, count - referenced.pages_new, referenced.pages_new, True, mmaps)
