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
from collections.abc import Callable, Iterator, Sequence

from dksm.dedup import admission, slot_arrays
from dksm.dedup.index import LeaseRecord, ManifestRecord, PoolIndex, SlotBlocks, Transaction
from dksm.dedup.mapping import slot_runs
from dksm.dedup.pages_file import PagesFile
from dksm.dedup.pool_errors import PoolError
from dksm.dedup.store import Store
from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE
from dksm.value import Value

HashKeys = Callable[[memoryview, int], list[bytes]]
"""``hash_keys(data, every)``: the index key of pages 0, every, 2 * every ... of data."""
_UNPLACED = (-1,)
# Pages a merge stores are copied out this many (512 KiB) at a time: the copy is
# then hashed and written while still in the core's cache (half its L2 on the
# machine measured; 4 MiB copies cost 15% more per page stored).
STORE_CHUNK = 128
# At most this many anchors are hashed and looked up at once.
_ANCHOR_BATCH = 64


class Admission(Value):
    """The slot of each page of a load, and how many of them it stored itself."""

    __slots__ = ("manifest", "pages_new", "runs", "slots")

    def __init__(
        self,
        slots: Sequence[int],
        pages_new: int,
        # the manifest the load used or made
        manifest: ManifestRecord | None = None,
        # (first slot, length, first page) of each run of consecutive slots, when
        # known without looking at every slot again.
        runs: list[tuple[int, int, int]] | None = None,
    ) -> None:
        self.slots = slots
        self.pages_new = pages_new
        self.manifest = manifest
        self.runs = runs


def _lease_to_reference(
    index: PoolIndex, txn: Transaction, lease_id: int, domain: str
) -> LeaseRecord | None:
    """The lease that references are about to be taken under, in the write
    transaction that takes them: None when the run switch is off (nothing may be
    referenced), an error when the lease is gone (released, or swept)."""
    if not index.run(txn):
        return None
    lease = index.lease(txn, lease_id)
    if lease is None:
        raise PoolError(
            f"lease {lease_id} is gone from the pool of domain {domain!r}: it was "
            "released, or swept because its owner looked dead"
        )
    return lease


def admit(
    store: Store,
    domain: str,
    lease_id: int,
    data: memoryview,
    hash_keys: HashKeys,
    started_ns: int,
    span_key: bytes | None = None,
    *,
    live: bool = False,
) -> Admission | None:
    """Find or store every page and reference it under the lease, in one transaction.

    Returns the slot of each page, or None when the run switch is off.  ``hash_keys``
    hashes pages the way every opener of the pool does; only the anchors a
    prediction needs are hashed (see :mod:`dksm.dedup.admission`).  With ``live`` the
    caller's memory may still change (a region being merged): the pages to store are
    copied before they are hashed, so what is stored always matches its hash.  The
    calling thread's CPU time since ``started_ns`` is added to ``merge_cpu_ns``.
    With a ``span_key`` (the load's whole content is an image's), a manifest of it is
    made if none has that key yet: it takes the references and the lease uses it, so
    the next load of the same content needs no per-page work (:func:`use_known`).
    """
    index = store.index
    pages = store.pages
    count = len(data) // PAGE_SIZE
    wrote = False
    try:
        with index.write() as txn:
            lease = _lease_to_reference(index, txn, lease_id, domain)
            if lease is None:
                return None
            pages.check_size()
            blocks = index.slot_blocks(txn)
            slots = array.array("q", _UNPLACED) * count
            predicted = _predicted_in_use(index, txn, blocks, pages.holds, data, hash_keys)
            for page, slot, length in predicted:
                blocks.add_run(slot, length)
                slots[page : page + length] = slot_arrays.consecutive(slot, length)
            placed = sum(length for _, _, length in predicted)
            rest = [page for page, slot in enumerate(slots) if slot < 0] if placed < count else []
            fresh_count = failed = 0
            if rest:
                wrote = True  # a failure from here on may leave pages to give back
                fresh_count, failed = _find_or_store(
                    index, txn, blocks, pages, data, rest, hash_keys, slots, copy=live
                )
            blocks.flush()
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
                    "pages_merged": count - fresh_count,
                    "merging_failed": failed,
                    "references": count,
                    "merge_cpu_ns": time.thread_time_ns() - started_ns,
                },
            )
    except BaseException:
        if wrote:
            _give_back_unindexed_space(store)
        raise
    runs = None if rest else _slot_runs_of(predicted)
    return Admission(slots, fresh_count, manifest, runs)


def _slot_runs_of(matched: list[admission.Run]) -> list[tuple[int, int, int]]:
    """The slot runs of a load whose pages all lie in these runs, in page order."""
    runs: list[tuple[int, int, int]] = []
    for page, slot, length in matched:
        if runs and runs[-1][0] + runs[-1][1] == slot and runs[-1][2] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, runs[-1][2])
        else:
            runs.append((slot, length, page))
    return runs


def _predicted_in_use(
    index: PoolIndex,
    txn: Transaction,
    blocks: SlotBlocks,
    holds: admission.SlotComparer,
    data: memoryview,
    hash_keys: HashKeys,
) -> list[admission.Run]:
    """The runs of ``data``'s pages that the slots predicted from its anchors hold:
    slots in use only, compared byte for byte (:mod:`dksm.dedup.admission`)."""

    count = len(data) // PAGE_SIZE
    found: dict[int, int | None] = {}
    batch = [1]

    def anchor_slot(page: int) -> int | None:
        # One anchor at first (a load the pool holds needs no other), then twice as
        # many per lookup while none is found (a load of new content), up to a bound.
        if page not in found:
            stop = min(count, page + batch[0] * admission.ANCHOR_EVERY)
            part = data[page * PAGE_SIZE : stop * PAGE_SIZE]
            keys = hash_keys(part, admission.ANCHOR_EVERY)
            slots = index.first_slots(txn, keys)
            for at, key in zip(range(page, stop, admission.ANCHOR_EVERY), keys, strict=True):
                raw = slots.get(key)
                found[at] = None if raw is None else int.from_bytes(raw, "big")
            batch[0] = 1 if slots else min(2 * batch[0], _ANCHOR_BATCH)
        return found[page]

    return admission.matched_predictions(
        data, anchor_slot, blocks.in_use_from, holds, index.end(txn)
    )


def _find_or_store(
    index: PoolIndex,
    txn: Transaction,
    blocks: SlotBlocks,
    pages: PagesFile,
    data: memoryview,
    rest: list[int],
    hash_keys: HashKeys,
    slots: array.array[int],
    *,
    copy: bool,
) -> tuple[int, int]:
    """Find by hash, else store, the pages ``rest`` of ``data``, referencing each and
    filling in its slot: (pages stored, pages stored after a hash collision).

    With ``copy`` (memory that may change meanwhile), or when they are only some of
    ``data``'s pages, they are copied out first, :data:`STORE_CHUNK` at a time into
    one buffer, and hashed, compared and stored from the copy; later chunks find the
    pages of earlier ones in the index."""
    if not copy and len(rest) * PAGE_SIZE == len(data):
        chunks: Iterator[tuple[list[int], memoryview]] = iter([(rest, data)])
    else:
        chunks = _copied(data, rest)
    stored = failed = 0
    for chunk, part in chunks:
        keys = hash_keys(part, 1)
        found, fresh, collided = _find_or_plan(index, txn, pages.holds, part, keys)
        first = stop = 0
        if fresh:
            first, _ = index.allocate(txn, len(fresh))
            stop = first + len(fresh)
            admission.place_new_pages(found, fresh, first)
            pages.write(first, [part[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] for p in fresh])
            uses = Counter(slot for slot in found if first <= slot < stop)
            blocks.create(first, [keys[p] for p in fresh], [uses[s] for s in range(first, stop)])
            stored += len(fresh)
            failed += len(collided.intersection(fresh))
        for page, slot in zip(chunk, found, strict=True):
            slots[page] = slot
            if not first <= slot < stop:
                blocks.add(slot)
    return stored, failed


def _copied(data: memoryview, pages: list[int]) -> Iterator[tuple[list[int], memoryview]]:
    """``pages`` of ``data`` in chunks of at most :data:`STORE_CHUNK`, each with a copy
    of its pages (in one buffer, reused: a chunk is done with before the next)."""
    buffer = memoryview(bytearray(min(len(pages), STORE_CHUNK) * PAGE_SIZE))
    for start in range(0, len(pages), STORE_CHUNK):
        chunk = pages[start : start + STORE_CHUNK]
        at = 0
        for first, length in admission.runs(chunk):
            size = length * PAGE_SIZE
            buffer[at : at + size] = data[first * PAGE_SIZE : first * PAGE_SIZE + size]
            at += size
        yield chunk, buffer[:at]


def _find_or_plan(
    index: PoolIndex,
    txn: Transaction,
    holds: admission.SlotComparer,
    data: memoryview,
    keys: list[bytes],
) -> tuple[list[int], list[int], set[int]]:
    """Find each page of ``data`` by its hash, confirming every match byte for byte:
    (slot of each page as :mod:`dksm.dedup.admission` writes them, the pages to
    store, the pages whose hash matched a page with other bytes)."""
    first_slots = index.first_slots(txn, keys)
    lookup = first_slots.get
    none = admission.NO_SLOT
    candidates = [int.from_bytes(lookup(key, none), "big") for key in keys]
    found, unconfirmed = admission.confirm(holds, data, candidates)
    collided: set[int] = set()  # pages whose hash matched a page with other bytes
    for page in unconfirmed:  # try the other slots with that hash
        others = index.slots_with_hash(txn, keys[page])
        slot = admission.find_equal(holds, data, page, others)
        if slot is None:
            collided.add(page)
        else:
            found[page] = slot
    fresh = admission.distinct_new_pages(data, keys, found, collided)
    return found, fresh, collided


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
    store.pages.check_size()
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
        lease = _lease_to_reference(index, txn, lease_id, domain)
        if lease is None:
            return None
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
        lease = _lease_to_reference(index, txn, lease_id, domain)
        if lease is None:
            return False
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
