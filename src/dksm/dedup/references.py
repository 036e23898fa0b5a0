"""The transactions that change what a pool holds: taking page references (finding
or storing the pages first, or all at once through a manifest), dropping a lease's
references, and punching space no slot uses.

:class:`~dksm.dedup.pool.PagePool` (sweep, hand-over) and
:class:`~dksm.dedup.lease.Lease` (loads, release) both change the pool only through
these functions, each of which keeps the invariants written at the top of
:mod:`dksm.dedup.pool`: references are named under their lease in the transaction
that takes them, and a slot is freed (and its page punched) only in the transaction
that drops its last reference.
"""

from __future__ import annotations

import array
import contextlib
import time
from collections import Counter
from collections.abc import Sequence

from dksm.dedup import admission
from dksm.dedup.index import ManifestRecord, Transaction
from dksm.dedup.mapping import slot_runs
from dksm.dedup.pool_errors import PoolError
from dksm.dedup.store import Store
from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE
from dksm.value import Value


class Admission(Value):
    """The slot of each page of a load, and how many of them it stored itself."""

    __slots__ = ("manifest", "pages_new", "slots")

    def __init__(
        self,
        slots: Sequence[int],
        pages_new: int,
        # the manifest the load used or made
        manifest: ManifestRecord | None = None,
    ) -> None:
        self.slots = slots
        self.pages_new = pages_new
        self.manifest = manifest


def _gone(lease_id: int, domain: str) -> PoolError:
    return PoolError(
        f"lease {lease_id} is gone from the pool of domain {domain!r}: it was "
        "released, or swept because its owner looked dead"
    )


def admit(
    store: Store,
    domain: str,
    lease_id: int,
    data: memoryview,
    hash_keys: list[bytes],
    started_ns: int,
    span_key: bytes | None = None,
) -> Admission | None:
    """Find or store every page and reference it under the lease, in one transaction.

    Returns the slot of each page, or None when the run switch is off.  The calling
    thread's CPU time since ``started_ns`` is added to ``merge_cpu_ns``.  With a
    ``span_key`` (the load's whole content is an image's), a manifest of it is made
    if none has that key yet: it takes the references and the lease uses it, so
    the next load of the same content needs no per-page work (:func:`use_known`).
    """
    index = store.index
    pages = store.pages
    count = len(hash_keys)
    wrote = False
    try:
        with index.write() as txn:
            if not index.run(txn):
                return None
            lease = index.lease(txn, lease_id)
            if lease is None:
                raise _gone(lease_id, domain)
            first_slots = index.first_slots(txn, hash_keys)
            lookup = first_slots.get
            none = admission.NO_SLOT
            candidates = [int.from_bytes(lookup(key, none), "big") for key in hash_keys]
            slots, unconfirmed = admission.confirm(pages.holds, data, candidates)
            collided: set[int] = set()  # pages whose hash matched a page with other bytes
            for page in unconfirmed:  # try the other slots with that hash
                others = index.slots_with_hash(txn, hash_keys[page])
                found = admission.find_equal(pages.holds, data, page, others)
                if found is None:
                    collided.add(page)
                else:
                    slots[page] = found

            fresh = admission.distinct_new_pages(data, hash_keys, slots, collided)
            failed = len(collided.intersection(fresh))
            if fresh:
                first, at_end = index.allocate(txn, len(fresh))
                admission.place_new_pages(slots, fresh, first)
                wrote = True  # a failure from here on leaves pages to give back
                pages.write(first, [data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] for p in fresh])
            counts = Counter(slots)
            if fresh:
                new_range = range(first, first + len(fresh))
                index.add_slots(txn, first, [hash_keys[p] for p in fresh], counts, at_end=at_end)
                existing = {s: n for s, n in counts.items() if s not in new_range}
            else:
                existing = counts
            if existing:
                index.add_references(txn, existing)
            manifest = None
            if span_key is not None and index.manifest(txn, span_key) is None:
                manifest_id = index.add_manifest(txn, span_key, slots)
                index.use_manifest(txn, lease, span_key, count)
                manifest = ManifestRecord(span_key, manifest_id, array.array("Q", slots))
            else:
                index.add_chunk(txn, lease, slots)
            index.add_to_counters(
                txn,
                {
                    "pages_scanned": count,
                    "pages_merged": count - len(fresh),
                    "merging_failed": failed,
                    "references": count,
                    "merge_cpu_ns": time.thread_time_ns() - started_ns,
                },
            )
    except BaseException:
        if wrote:
            _give_back_unindexed_space(store)
        raise
    return Admission(slots, len(fresh), manifest)


def find_known(store: Store, span_key: bytes, data: memoryview) -> ManifestRecord | None:
    """The manifest of ``data``'s content, if the pool has one under ``span_key`` and
    its slots hold exactly ``data`` (compared in place, a run of slots at a time:
    a key names a candidate, only the bytes prove it).

    Runs in a read transaction and compares after it: :func:`use_known` then takes
    the references only if the manifest is still the one compared (same id), i.e.
    existed, and so pinned its slots, throughout."""
    with store.index.read() as txn:
        manifest = store.index.manifest(txn, span_key)
    if manifest is None:
        return None
    slots = manifest.slots
    for first, length, page in slot_runs(slots):
        part = data[page * PAGE_SIZE : (page + length) * PAGE_SIZE]
        if not store.pages.holds(first, part):
            return None
    return manifest


def use_known(
    store: Store, domain: str, lease_id: int, manifest: ManifestRecord, started_ns: int
) -> bool | None:
    """Take every reference of a load through its manifest, in one write transaction
    whose work does not grow with the load: one more use of the manifest, counted
    under the lease.  False if the manifest changed since :func:`find_known`
    compared it (the caller loads page by page); None when the run switch is off."""
    index = store.index
    count = len(manifest.slots)
    with index.write() as txn:
        if not index.run(txn):
            return None
        lease = index.lease(txn, lease_id)
        if lease is None:
            raise _gone(lease_id, domain)
        current = index.manifest_id(txn, manifest.key)
        if current != manifest.manifest_id:
            return False
        index.use_manifest(txn, lease, manifest.key, count)
        index.add_to_counters(
            txn,
            {
                "pages_scanned": count,
                "pages_merged": count,
                "references": count,
                "manifest_pages": count,
                "merge_cpu_ns": time.thread_time_ns() - started_ns,
            },
        )
    return True


def reference_again(
    store: Store, domain: str, lease_id: int, slots: Sequence[int], started_ns: int
) -> bool:
    """Reference ``slots`` (held under another live lease of this process) again under
    ``lease_id``: nothing hashed or compared, since a slot's bytes cannot change
    while a reference to it lives.  False when the run switch is off."""
    index = store.index
    counts = Counter(slots)
    with index.write() as txn:
        if not index.run(txn):
            return False
        lease = index.lease(txn, lease_id)
        if lease is None:
            raise _gone(lease_id, domain)
        if not index.all_slots_exist(txn, counts):
            raise PoolError("pages to reference again were released meanwhile")
        index.add_references(txn, counts)
        index.add_chunk(txn, lease, slots)
        count = len(slots)
        index.add_to_counters(
            txn,
            {
                "pages_scanned": count,
                "pages_merged": count,
                "references": count,
                "merge_cpu_ns": time.thread_time_ns() - started_ns,
            },
        )
    return True


def drop_lease(store: Store, txn: Transaction, lease_id: int) -> int:
    """Remove a lease and its references, freeing (and punching) slots that reach
    zero; returns how many were freed."""
    counts, held = store.index.remove_lease(txn, lease_id)
    freed = store.index.drop_references(txn, counts) if counts else []
    if held:
        store.index.add_to_counters(txn, {"references": -held})
    runs = admission.runs(sorted(freed))
    store.index.release_runs(txn, runs)
    for first, length in runs:
        store.pages.punch(first, length)
    return len(freed)


def punch_leftovers(store: Store, txn: Transaction) -> None:
    """Punch free space that holds blocks (the caller holds the write lock)."""
    entries, _ = store.index.entries(txn)
    if store.pages.allocated_bytes() <= entries * PAGE_SIZE:
        return
    for first, length in store.index.free_ranges(txn):
        store.pages.punch(first, length)
    end = store.index.end(txn)
    tail = -(-store.pages.size() // PAGE_SIZE) - end
    if tail > 0:
        store.pages.punch(end, tail)


def _give_back_unindexed_space(store: Store) -> None:
    """After a failed load: punch the pages it wrote into slots its aborted
    transaction never recorded, so the space is free at once (not only at another
    process's sweep).  Under the write lock, as every punch."""
    with contextlib.suppress(DksmError), store.index.inspect() as txn:
        punch_leftovers(store, txn)
