"""A lease: one process's claim on pool pages, through which it loads and maps them.

Every page a process maps from a pool is referenced under one of its leases, written
before the page is mapped and dropped only when the lease is released (or swept
after its owner died): the invariants at the top of :mod:`dksm.dedup.pool`.  The
transactions themselves are :mod:`dksm.dedup.references`'; this module checks the
caller's input, hashes outside the lock, and maps what was admitted.
"""

from __future__ import annotations

import os
import time
from types import TracebackType

from dksm.dedup.mapping import MergeResult, ReferencedPages, map_slots
from dksm.dedup.pool_errors import PoolError
from dksm.dedup.references import (
    Admission,
    admit,
    drop_lease,
    find_known,
    reference_again,
    use_known,
)
from dksm.dedup.store import Store, release_store
from dksm.memory.host_mapping import PAGE_SIZE, view

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Self

    from dksm.dedup.pool import PagePool

# merge() takes a region this many pages (64 MiB) at a time, one transaction each:
# large enough that the work per transaction is spread over many pages, small
# enough to bound the time other processes wait for the lock.
_MERGE_BATCH = 16384


class Lease:
    """A process's claim on pool pages: every page it maps is referenced here.

    Release it (or leave its ``with`` block) after unmapping those pages, or let the
    process exit: the next opener of the pool sweeps leases of dead processes.
    """

    def __init__(self, pool: PagePool, store: Store, lease_id: int) -> None:
        self.pool = pool
        self.lease_id = lease_id
        self._store = store
        self._released = False
        self._references = 0

    @property
    def references(self) -> int:
        """Page references this lease holds."""
        return self._references

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _check_usable(self) -> None:
        if self._released:
            raise PoolError(f"lease {self.lease_id} has been released")
        if self._store.pid != os.getpid() or self._store.closed:
            raise PoolError(
                f"lease {self.lease_id} belongs to process {self._store.pid}, not to {os.getpid()}"
            )

    def map_pages(self, address: int, content: bytes | bytearray | memoryview) -> MergeResult:
        """Make ``content`` (whole pages) appear at page-aligned ``address`` from the pool.

        ``address`` must lie in memory this process owns (guest RAM, say): the pool's
        pages are mapped over it with ``MAP_FIXED``.  When the run switch is off
        nothing is mapped and ``mapped`` is False; the caller copies the bytes itself.
        """
        self._check_usable()
        data = memoryview(content).cast("B")
        return self._map_pages(address, data, time.thread_time_ns(), whole=True)

    def _map_pages(
        self, address: int, data: memoryview, started_ns: int, *, whole: bool, live: bool = False
    ) -> MergeResult:
        if address % PAGE_SIZE:
            raise PoolError(f"address {address:#x} is not page aligned")
        if len(data) % PAGE_SIZE:
            raise PoolError(f"{len(data)} bytes of content are not a whole number of pages")
        count = len(data) // PAGE_SIZE
        if count == 0:
            return MergeResult(0, 0, 0, True, 0)
        admitted = self._admit(data, started_ns, whole=whole, live=live)
        if admitted is None:
            return MergeResult(count, 0, 0, False, 0)
        self._references += count
        mmaps = map_slots(self._store.pages.fd, address, admitted.slots, admitted.runs)
        return MergeResult(count, count - admitted.pages_new, admitted.pages_new, True, mmaps)

    def _admit(
        self, data: memoryview, started_ns: int, *, whole: bool, live: bool = False
    ) -> Admission | None:
        """Reference ``data``'s pages under this lease: through the manifest of its
        content when it is a whole load (an image's span) the pool already holds,
        else page by page (making the manifest of a whole load for next time).
        Hashing and comparing happen outside the write lock."""
        store, domain = self._store, self.pool.domain
        span_key = self.pool.span_key(data) if whole else None
        if span_key is not None:
            known = find_known(store, span_key, data)
            if known is not None:
                used = use_known(store, domain, self.lease_id, known, started_ns)
                if used is None:
                    return None
                if used:
                    return Admission(known.slots, 0, known)
        return admit(
            store, domain, self.lease_id, data, self.pool.hash_keys, started_ns, span_key,
            live=live,
        )  # fmt: skip

    def reference_pages(self, content: bytes | bytearray | memoryview) -> ReferencedPages | None:
        """Find or store ``content`` (whole pages) and reference it under this lease,
        without mapping it: for a launcher that hands the lease to the process that
        will map it (:meth:`PagePool.hand_over`).  None when the run switch is off."""
        self._check_usable()
        started_ns = time.thread_time_ns()
        data = memoryview(content).cast("B")
        if len(data) % PAGE_SIZE:
            raise PoolError(f"{len(data)} bytes of content are not a whole number of pages")
        if not data:
            return ReferencedPages((), 0)
        admitted = self._admit(data, started_ns, whole=True)
        if admitted is None:
            return None
        self._references += len(admitted.slots)
        return ReferencedPages(tuple(admitted.slots), admitted.pages_new, admitted.manifest)

    def reference_again(self, held: ReferencedPages) -> ReferencedPages | None:
        """Reference, under this lease, pages this process already holds under another
        live lease: a launcher's second VM of an image.  Nothing is hashed, read or
        compared: a slot's bytes cannot change while any reference to it lives, and
        the transaction checks that every slot still does.  None when the run switch
        is off."""
        self._check_usable()
        started_ns = time.thread_time_ns()
        store, domain = self._store, self.pool.domain
        if held.manifest is not None:
            # The manifest still being the one compared (its id unchanged) proves its
            # slots kept their bytes: one more use of it, nothing per page.
            used = use_known(store, domain, self.lease_id, held.manifest, started_ns)
            if used is None:
                return None
            if used:
                self._references += len(held.slots)
                return ReferencedPages(held.slots, 0, held.manifest)
        if not reference_again(store, domain, self.lease_id, held.slots, started_ns):
            return None
        self._references += len(held.slots)
        return ReferencedPages(held.slots, 0)

    def merge(self, address: int, length: int) -> MergeResult:
        """Replace the pages of a populated private region with pool mappings.

        The madvise-like API: the region's bytes are compared in place with the
        pool's (the pages the pool lacks are copied out, then hashed and stored), and
        the pool's pages are mapped over the region.  Only regions nobody writes
        meanwhile may be merged: a write between the comparison and the mapping is
        lost.
        """
        self._check_usable()
        if address % PAGE_SIZE or length % PAGE_SIZE:
            raise PoolError(f"region {address:#x}+{length:#x} is not whole pages")
        pages = merged = new = mmaps = 0
        step = _MERGE_BATCH * PAGE_SIZE
        for offset in range(0, length, step):
            started_ns = time.thread_time_ns()
            batch = view(address + offset, min(step, length - offset))
            result = self._map_pages(address + offset, batch, started_ns, whole=False, live=True)
            if not result.mapped:
                return MergeResult(pages + result.pages, merged, new, False, mmaps)
            pages += result.pages
            merged += result.pages_merged
            new += result.pages_new
            mmaps += result.mmaps
        return MergeResult(pages, merged, new, True, mmaps)

    def release(self) -> None:
        """Drop every reference of this lease, freeing slots no one else holds.

        Unmap this lease's pages first (see the module documentation).
        """
        if self._released:
            return
        if self._store.pid != os.getpid():
            raise PoolError(
                f"lease {self.lease_id} belongs to process {self._store.pid}, not to {os.getpid()}"
            )
        store = self._store
        if not store.closed:
            with store.index.write() as txn:
                drop_lease(store, txn, self.lease_id)
        self._released = True
        self._references = 0
        release_store(store)
