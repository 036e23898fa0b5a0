"""The page pool: every distinct read-only page of a sharing domain stored once, and
mapped copy-on-write into each process that loads it.

Design
======

A *domain* (one tenant's trust boundary) has a directory under the pool root
(``/dev/shm/dksm`` for root and ``/dev/shm/dksm-UID`` for other users, or
``$DKSM_POOL_ROOT``, or an explicit argument) holding the files below.  Only their
owner may change any of them, and none is reached through a name another user could
have placed (:mod:`dksm.dedup.trust`); :mod:`dksm.dedup.store` finds, checks,
creates and removes them.

``pages``
    the pages file on tmpfs.  Slot *s* is the page at offset ``s * 4096``.  tmpfs
    pages are page-cache pages, so every ``MAP_PRIVATE`` mapping of a slot, in any
    process, uses the same physical frame until it writes to it (then it gets a
    private copy and the file keeps its bytes).
``index/``
    an LMDB environment (schema in :mod:`dksm.dedup.index`): page hash -> slots,
    slot -> hash and reference count, lease -> owner and the slots it holds, free
    slot ranges, counters, and the ``run`` switch.
``lock``
    held shared by every process that has the pool open, exclusively while the pool
    is created or purged.
``ready``
    written last when the pool is created: without it the directory is a creation
    (or purge) that died half-way and is cleared by the next creator.

A pool whose files contradict themselves (an index LMDB cannot read, a lease naming
a slot the index lacks, a pages file shorter than its slots) is never used: every
operation that meets the damage raises :class:`PoolDamagedError`, saying what is
wrong; :meth:`PagePool.verify` lists the problems and :func:`force_purge` removes
such a pool without opening its index.

Loading content (:meth:`Lease.map_pages`) hashes each page (xxh3-64) before taking
the lock, then in one LMDB write transaction looks each hash up, confirms every hash
match byte for byte against the pages file, stores the pages it did not find in
consecutive slots (first fit among free ranges, else at the end), takes one
reference per page and names those references in the caller's lease.  After the
commit it maps the slots over the caller's memory, one ``mmap`` per run of
consecutive slots.  There is no daemon: reclaim happens when a lease is released,
and the leases of dead processes are swept by whichever process next opens the pool.

Invariants
==========

Everything else relies on these:

1. **A lease is written before a slot is mapped.**  The references a process takes
   are recorded under its lease in the same write transaction that takes them, and
   it maps nothing before that transaction commits.  So every mapping of a slot is
   covered by a reference that outlives it; a process killed at any instant leaves
   at worst references without mappings, which the sweep returns.
2. **A slot is freed only inside the write transaction that drops its last
   reference.**  LMDB admits one writer at a time, and a loader takes its
   references inside a write transaction, so no loader can find (let alone map) a
   slot in the window between its count reaching zero and its page being punched
   out of the file.  Exact counts matter because punching a hole in a tmpfs file
   unmaps those pages from every private mapping that has not copied them: one
   reference too few and a live VM suddenly reads zeros.
3. **Bytes are compared before a page is shared.**  A hash match is only a
   candidate; it is confirmed against the pages file byte for byte, and a mismatch
   stores the page in a new slot (counted in ``merging_failed``).  A weak or
   colliding hash costs time, never correctness.
4. **Only read-only content enters the pool** (a contract on callers).  The pool
   stores what it is given; sharing is only sound for pages no sharer modifies in
   place -- code and read-only data -- since a shared page must mean the same to
   everyone.  Writes to a mapped page stay private (copy-on-write), so a misbehaving
   sharer harms only itself, but content it later merges is whatever it wrote.
5. **An empty pool holds nothing**: with no slot in the index the pages file has
   no allocated block, and the index no hash, slot, lease or free-range entry.

Releasing and unmapping
=======================

A process must stop using its mappings of pool pages *before* releasing the lease
that covers them: unmap (or remap anonymous memory over) them first, or release at
exit, after which the kernel has dropped the mappings anyway.  Releasing first
would let the slots be punched while still mapped, and a live VM would read zeros.
Leases of processes that die are released by the sweep, after their mappings are
gone with them.

Concurrency and crashes
=======================

Any number of processes, and threads in them, may use one pool.  A writer killed
mid-transaction loses the transaction (LMDB's write mutex is robust), so the index
is always as the last commit left it, and the file may differ from it in two ways,
both harmless:

- pages it had written for new slots lie in space the index still calls free; the
  next sweep that sees the file holding more blocks than the index has slots
  punches the free space;
- slots it had punched while releasing a lease are holes although the index still
  lists them -- referenced only by the dead process's lease (they were about to
  reach zero), so nobody maps them, and a loader comparing bytes against a hole
  finds a mismatch and stores its page anew.  The sweep of that lease frees them.

Owners are identified by pid and start time (pid reuse is not ownership) and, to be
safe across containers, only leases from the sweeper's own pid namespace are judged.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Self

import lmdb
import xxhash

from dksm.dedup.index import LeaseRecord, from_u64
from dksm.dedup.mapping import MergeResult, ReferencedPages, map_slots
from dksm.dedup.owner import ProcessIdentity
from dksm.dedup.pages_file import PagesFile
from dksm.dedup.pool_errors import PoolDamagedError, PoolError, PoolMissingError
from dksm.dedup.store import (
    DEFAULT_DOMAIN,
    DEFAULT_POOL_ROOT,
    POOL_ROOT_ENV,
    Store,
    acquire_store,
    add_user,
    default_pool_root,
    force_remove,
    pool_directory,
    pool_root,
    release_store,
    remove_store,
    validate_domain,
)
from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE, view

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_POOL_ROOT",
    "POOL_ROOT_ENV",
    "Lease",
    "LeaseInfo",
    "PagePool",
    "PoolDamagedError",
    "PoolError",
    "PoolMissingError",
    "PoolStats",
    "default_pool_root",
    "force_purge",
    "page_key",
    "pool_directory",
    "pool_root",
    "validate_domain",
]

PageHash = Callable[[memoryview], int]
"""A page's 64-bit hash.  Pools are shared, so every opener must use the same one."""


def page_key(page: bytes | memoryview) -> bytes:
    """The key under which a pool with the default hash (xxh3-64) indexes ``page``:
    what a caller compares with :meth:`PagePool.page_keys` to learn, without
    loading anything, which of its pages a pool already holds."""
    return xxhash.xxh3_64_digest(page)  # the big-endian bytes of the 64-bit hash


# Hash matches are confirmed by reading runs of consecutive candidate slots at most
# this long: 64 KiB buffers stay in the malloc heap instead of faulting in fresh
# pages on every call.
_COMPARE_RUN = 16
# merge() snapshots a region this many pages at a time, one transaction each.
_MERGE_BATCH = 256
_NO_SLOT = b"\xff" * 8  # sorts after every real slot; never allocated
_NO_SLOT_NUMBER = from_u64(_NO_SLOT)


@dataclass(frozen=True)
class PoolStats:
    """The pool's counters, named as in the DKSM thesis (``/sys/kernel/mm/dksm``)."""

    pages_scanned: int  # pages offered to the pool while it ran
    pages_merged: int  # pages that matched a page already in the pool
    merging_failed: int  # pages whose hash matched but bytes differed
    hashtable_entries: int  # distinct pages in the pool (slots in use)
    leases: int
    references: int  # sum of all slots' reference counts
    pages_saved: int  # references - hashtable_entries
    bytes_saved: int
    file_blocks_bytes: int  # storage the pages file holds (st_blocks * 512)
    run: bool
    # CPU time the loading threads of every process spent hashing, comparing and
    # storing pages (mapping excluded): dksm's counterpart of ksmd's CPU time.
    merge_cpu_ns: int = 0

    def to_json(self) -> dict[str, int | bool]:
        return asdict(self)


@dataclass(frozen=True)
class LeaseInfo:
    """One lease as the index records it."""

    lease_id: int
    pid: int
    start_time: int
    references: int
    alive: bool


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _runs(sorted_slots: Sequence[int]) -> list[tuple[int, int]]:
    """Group ascending slot numbers into (first, length) runs of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for slot in sorted_slots:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


# -- the pool --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Admission:
    slots: list[int]
    pages_new: int


class PagePool:
    """One sharing domain's page pool, open in this process.  Use :meth:`open`."""

    def __init__(self, store: Store, domain: str, page_hash: PageHash | None) -> None:
        self._store = store
        self.domain = domain
        self.directory = store.directory
        self._closed = False
        self._hash_key: Callable[[memoryview], bytes]
        if page_hash is None:
            self._hash_key = page_key
        else:
            custom = page_hash
            self._hash_key = lambda page: (custom(page) & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "big")

    @classmethod
    def open(
        cls,
        domain: str = DEFAULT_DOMAIN,
        root: str | os.PathLike[str] | None = None,
        *,
        page_hash: PageHash | None = None,
        sweep: bool = True,
        create: bool = True,
    ) -> PagePool:
        """Open (creating if needed) a domain's pool and sweep the leases of dead owners.

        ``page_hash`` replaces xxh3-64, e.g. with a deliberately weak hash in tests;
        ``sweep=False`` leaves the sweep to an explicit :meth:`sweep` call;
        ``create=False`` raises :class:`PoolMissingError` instead of creating a pool.
        A pool (or a way to it) that another user could change is refused
        (:mod:`dksm.dedup.trust`), and so is one whose files are damaged
        (:class:`PoolDamagedError`).
        """
        store = acquire_store(domain, root, create=create)
        pool = cls(store, domain, page_hash)
        try:
            if sweep:
                pool.sweep()
        except BaseException:
            pool.close()
            raise
        return pool

    def close(self) -> None:
        """Let go of the pool files (live leases keep them open until released)."""
        if not self._closed:
            self._closed = True
            if self._store.pid == os.getpid():
                release_store(self._store)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _usable_store(self) -> Store:
        if self._closed:
            raise PoolError(f"the pool of domain {self.domain!r} is closed")
        if self._store.pid != os.getpid() or self._store.closed:
            raise PoolError(
                f"this handle on the pool of domain {self.domain!r} belongs to process "
                f"{self._store.pid}; open the pool again in process {os.getpid()}"
            )
        return self._store

    # -- leases ------------------------------------------------------------------------

    def lease(self) -> Lease:
        """A new lease owned by this process (several may coexist)."""
        store = self._usable_store()
        me = ProcessIdentity.current()
        with store.index.write() as txn:
            lease_id = store.index.new_lease(txn, me.pid, me.start_time, _pid_namespace())
        add_user(store)
        return Lease(self, store, lease_id)

    def leases(self) -> list[LeaseInfo]:
        store = self._usable_store()
        with store.index.read() as txn:
            records = store.index.lease_records(txn)
        return [
            LeaseInfo(r.lease_id, r.pid, r.start_time, r.references, _owner_alive(r))
            for r in records
        ]

    def sweep(self) -> int:
        """Release the leases of dead owners; return how many there were.

        Also punches pages a writer killed mid-transaction left in free space.
        """
        store = self._usable_store()
        index = store.index
        index.reader_check()  # reader slots of dead processes pin old pages
        with index.read() as txn:
            records = index.lease_records(txn)
            entries, _ = index.entries(txn)
        namespace = _pid_namespace()
        dead = [r for r in records if r.pid_namespace == namespace and not _owner_alive(r)]
        if not dead and store.pages.allocated_bytes() <= entries * PAGE_SIZE:
            return 0
        with index.write() as txn:
            swept = 0
            for record in dead:
                if index.lease(txn, record.lease_id) is not None:
                    self._drop_lease(txn, record.lease_id)
                    swept += 1
            self._punch_leftovers(txn)
        return swept

    def _punch_leftovers(self, txn: lmdb.Transaction[bytes]) -> None:
        """Punch free space that holds blocks (the caller holds the write lock)."""
        store = self._store
        entries, _ = store.index.entries(txn)
        if store.pages.allocated_bytes() <= entries * PAGE_SIZE:
            return
        for first, length in store.index.free_ranges(txn):
            store.pages.punch(first, length)
        end = store.index.end(txn)
        tail = -(-store.pages.size() // PAGE_SIZE) - end
        if tail > 0:
            store.pages.punch(end, tail)

    def _drop_lease(self, txn: lmdb.Transaction[bytes], lease_id: int) -> int:
        """Remove a lease and its references, freeing slots that reach zero."""
        store = self._store
        counts = store.index.remove_lease(txn, lease_id)
        if not counts:
            return 0
        freed = store.index.drop_references(txn, counts)
        runs = _runs(sorted(freed))
        store.index.release_runs(txn, runs)
        for first, length in runs:
            store.pages.punch(first, length)
        store.index.add_to_counters(txn, {"references": -sum(counts.values())})
        return len(freed)

    # -- loading -----------------------------------------------------------------------

    def _hash_pages(self, data: memoryview) -> list[bytes]:
        key = self._hash_key
        return [key(data[offset : offset + PAGE_SIZE]) for offset in range(0, len(data), PAGE_SIZE)]

    def _admit(
        self, lease_id: int, data: memoryview, hash_keys: list[bytes], started_ns: int
    ) -> _Admission | None:
        """Find or store every page and reference it under the lease, in one transaction.

        Returns the slot of each page, or None when the run switch is off.  The
        calling thread's CPU time since ``started_ns`` is added to ``merge_cpu_ns``.
        """
        store = self._store
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
                    raise PoolError(
                        f"lease {lease_id} is gone from the pool of domain {self.domain!r}: it was "
                        "released, or swept because its owner looked dead"
                    )
                first_slots = index.first_slots(txn, hash_keys)
                lookup = first_slots.get
                candidates = [int.from_bytes(lookup(key, _NO_SLOT), "big") for key in hash_keys]
                slots, unconfirmed = _confirm(pages, data, candidates)
                collided: set[int] = set()  # pages whose hash matched a page with other bytes
                for page in unconfirmed:  # try the other slots with that hash
                    found = _find_equal(
                        pages, data, page, index.slots_with_hash(txn, hash_keys[page])
                    )
                    if found is None:
                        collided.add(page)
                    else:
                        slots[page] = found

                fresh = _distinct_new_pages(data, hash_keys, slots, collided)
                failed = len(collided.intersection(fresh))
                if fresh:
                    first, at_end = index.allocate(txn, len(fresh))
                    for offset, page in enumerate(fresh):
                        slots[page] = first + offset
                    for page, slot in enumerate(slots):
                        if slot < 0:  # a twin of a new page: -2 - (its position in fresh)
                            slots[page] = first - 2 - slot
                    wrote = True  # a failure from here on leaves pages to give back
                    pages.write(first, [data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] for p in fresh])
                counts = Counter(slots)
                if fresh:
                    new_range = range(first, first + len(fresh))
                    index.add_slots(
                        txn, first, [hash_keys[p] for p in fresh], counts, at_end=at_end
                    )
                    existing = {s: n for s, n in counts.items() if s not in new_range}
                else:
                    existing = counts
                if existing:
                    index.add_references(txn, existing)
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
                self._give_back_unindexed_space()
            raise
        return _Admission(slots, len(fresh))

    def _give_back_unindexed_space(self) -> None:
        """After a failed load: punch the pages it wrote into slots its aborted
        transaction never recorded, so the space is free at once (not only at another
        process's sweep).  Under the write lock, as every punch."""
        with contextlib.suppress(DksmError), self._store.index.inspect() as txn:
            self._punch_leftovers(txn)

    def _map_slots(self, address: int, slots: Sequence[int]) -> int:
        return map_slots(self._store.pages.fd, address, slots)

    def hand_over(self, lease: Lease, owner: ProcessIdentity) -> None:
        """Make ``owner`` (a live process, typically just forked) the lease's owner.

        For launchers: a parent references the pages of the VMs a child will run
        (:meth:`Lease.reference_pages`), forks, hands each lease over, and only then
        lets the child map the slots (:class:`SlotMapper`).  Every instant is covered:
        before the hand-over the parent owns the references and nothing is mapped;
        after it, the references live exactly as long as the process that maps them,
        and the sweep returns them if that process dies.  The parent keeps the
        :class:`Lease` object to release it once the child has unmapped its pages.
        """
        store = self._usable_store()
        with store.index.write() as txn:
            record = store.index.lease(txn, lease.lease_id)
            if record is None:
                raise PoolError(f"lease {lease.lease_id} is gone; it cannot be handed over")
            store.index.set_lease_owner(txn, record, owner.pid, owner.start_time)

    def pages_fd(self) -> int:
        """A new read-only descriptor of the pages file, for :class:`SlotMapper`;
        the caller closes it."""
        return self._usable_store().open_pages_readonly()

    # -- control and inspection --------------------------------------------------------

    def set_run(self, run: bool) -> None:
        """Turn merging on or off, for every process, like /sys/kernel/mm/dksm/run.

        Off, loads map nothing (callers copy the bytes themselves); existing mappings
        and leases stay.
        """
        store = self._usable_store()
        with store.index.write() as txn:
            store.index.set_run(txn, run)

    def page_keys(self) -> frozenset[bytes]:
        """The hash key of every page the pool holds (see :func:`page_key`).  A key
        only names a candidate: the bytes are compared when a page is loaded, so a
        caller that plans by keys (placement) can at worst misjudge a collision."""
        store = self._usable_store()
        with store.index.read() as txn:
            return frozenset(key for key, _ in store.index.hash_entries(txn))

    def stats(self) -> PoolStats:
        store = self._usable_store()
        with store.index.read() as txn:
            counters = store.index.read_counters(txn)
            entries, leases = store.index.entries(txn)
            run = store.index.run(txn)
        references = counters["references"]
        return PoolStats(
            pages_scanned=counters["pages_scanned"],
            pages_merged=counters["pages_merged"],
            merging_failed=counters["merging_failed"],
            hashtable_entries=entries,
            leases=leases,
            references=references,
            pages_saved=references - entries,
            merge_cpu_ns=counters["merge_cpu_ns"],
            bytes_saved=(references - entries) * PAGE_SIZE,
            file_blocks_bytes=store.pages.allocated_bytes(),
            run=run,
        )

    def verify(self, *, check_hashes: bool = True) -> list[str]:
        """Check the index against itself and the pages file; return the problems found.

        Runs inside a write transaction (then aborted) so no writer changes the file
        meanwhile.  An empty list means the pool is consistent.
        """
        store = self._usable_store()
        with store.index.inspect() as txn:
            try:
                return list(self._problems(txn, check_hashes))
            except PoolDamagedError as error:  # a record too broken to read on
                return [str(error)]

    def _problems(self, txn: lmdb.Transaction[bytes], check_hashes: bool) -> Iterator[str]:
        index = self._store.index
        pages = self._store.pages
        end = index.end(txn)
        slot_records = {r.slot: r for r in index.slot_records(txn)}
        hash_entries = list(index.hash_entries(txn))
        for page_hash, slot in hash_entries:
            record = slot_records.get(slot)
            if record is None or record.page_hash != page_hash:
                yield f"hash {page_hash.hex()} names slot {slot}, which does not hold it"
        if len(hash_entries) != len(slot_records):
            yield f"{len(hash_entries)} hash entries for {len(slot_records)} slots"
        held: Counter[int] = Counter()
        leases = {r.lease_id: r for r in index.lease_records(txn)}
        for lease_id in index.lease_ids_with_chunks(txn) | set(leases):
            lease_total = 0
            for _, chunk in index.lease_chunks(txn, lease_id):
                held.update(chunk)
                lease_total += len(chunk)
            lease = leases.get(lease_id)
            if lease is None:
                yield f"slots are held under lease {lease_id}, which does not exist"
            elif lease.references != lease_total:
                yield f"lease {lease_id} counts {lease.references} references, holds {lease_total}"
        for slot, record in slot_records.items():
            if record.references != held[slot]:
                yield f"slot {slot} counts {record.references} references, leases hold {held[slot]}"
            if slot >= end:
                yield f"slot {slot} lies beyond the end ({end})"
        for slot in held.keys() - slot_records.keys():
            yield f"leases hold slot {slot}, which is not in the pool"
        counters = index.read_counters(txn)
        if counters["references"] != held.total():
            yield f"references counter {counters['references']} != {held.total()} held"
        previous_end = -1
        free_slots = 0
        for first, length in index.free_ranges(txn):
            if length <= 0 or first <= previous_end or first + length >= end:
                yield f"free range {first}+{length} overlaps, touches another or the end ({end})"
            if any(first <= slot < first + length for slot in slot_records):
                yield f"free range {first}+{length} holds slots in use"
            previous_end = first + length
            free_slots += length
        if free_slots + len(slot_records) != end:
            yield f"{len(slot_records)} slots and {free_slots} free do not make up the end {end}"
        blocks = pages.allocated_bytes()
        if blocks != len(slot_records) * PAGE_SIZE:
            yield f"the pages file holds {blocks} bytes for {len(slot_records)} pages"
        if pages.size() < end * PAGE_SIZE:
            yield f"the pages file is shorter than its {end} slots"
        if check_hashes:
            for slot, record in slot_records.items():
                page = memoryview(pages.read(slot, 1))
                if self._hash_key(page) != record.page_hash:
                    yield f"slot {slot} does not hold a page with its recorded hash"

    def purge(self) -> list[str]:
        """Remove the pool's files, after sweeping; refused while live leases exist or
        another process has the pool open.  This handle is closed afterwards.
        Returns the names left in the pool directory because dksm did not make them."""
        store = self._usable_store()
        self.sweep()
        live = self.leases()
        if live:
            owners = ", ".join(sorted({str(lease.pid) for lease in live}))
            raise PoolError(
                f"the pool of domain {self.domain!r} still has {len(live)} live lease(s), held "
                f"by process(es) {owners}; stop them (or release the leases) before purging"
            )
        left = remove_store(store, self.domain)
        self._closed = True
        return left


def force_purge(
    domain: str = DEFAULT_DOMAIN, root: str | os.PathLike[str] | None = None
) -> list[str]:
    """Remove a domain's pool even if its index cannot be opened (a damaged pool),
    as long as no process has it open.  Nothing is followed and only the owner's files
    are removed; returns the names left because dksm did not make them."""
    return force_remove(domain, root)


def _owner_alive(record: LeaseRecord) -> bool:
    return ProcessIdentity(record.pid, record.start_time).is_alive()


def _confirm(
    pages: PagesFile, data: memoryview, candidates: list[int]
) -> tuple[list[int], list[int]]:
    """Compare each page with its candidate slot: (slot or -1 per page, mismatched pages).

    Runs of pages whose candidates are consecutive slots -- an image already in the
    pool -- are read and compared a run at a time.
    """
    count = len(candidates)
    slots = [-1] * count
    mismatched: list[int] = []
    start = 0
    while start < count:
        first = candidates[start]
        if first == _NO_SLOT_NUMBER:
            start += 1
            continue
        stop = start + 1
        while (
            stop < count
            and stop - start < _COMPARE_RUN
            and candidates[stop] == first + stop - start
        ):
            stop += 1
        stored = pages.read(first, stop - start)
        # bytearray == memoryview is one memcmp; memoryview == x compares item by item.
        if stored == data[start * PAGE_SIZE : stop * PAGE_SIZE]:
            slots[start:stop] = range(first, first + stop - start)
        else:
            for page in range(start, stop):
                offset = (page - start) * PAGE_SIZE
                if (
                    stored[offset : offset + PAGE_SIZE]
                    == data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
                ):
                    slots[page] = first + page - start
                else:
                    mismatched.append(page)
        start = stop
    return slots, mismatched


def _find_equal(pages: PagesFile, data: memoryview, page: int, slots: list[int]) -> int | None:
    wanted = data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
    for slot in slots:
        if pages.read(slot, 1) == wanted:
            return slot
    return None


def _distinct_new_pages(
    data: memoryview, hash_keys: list[bytes], slots: list[int], collided: set[int]
) -> list[int]:
    """The pages to store (those without a slot, each distinct content once), in order.

    A later page equal to one of them gets ``-2 - i`` in ``slots``, i being the
    position of its twin in the returned list.  Pages whose hash matched an earlier
    new page with other bytes are added to ``collided``.
    """
    fresh: list[int] = []
    by_hash: dict[bytes, list[int]] = {}
    for page, slot in enumerate(slots):
        if slot != -1:
            continue
        twins = by_hash.setdefault(hash_keys[page], [])
        if twins:
            content = data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE].tobytes()
            for position in twins:
                twin = fresh[position]
                if content == data[twin * PAGE_SIZE : (twin + 1) * PAGE_SIZE].tobytes():
                    slots[page] = -2 - position
                    break
            else:
                collided.add(page)
                twins.append(len(fresh))
                fresh.append(page)
        else:
            twins.append(len(fresh))
            fresh.append(page)
    return fresh


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
        return self._map_pages(address, memoryview(content).cast("B"), time.thread_time_ns())

    def _map_pages(self, address: int, data: memoryview, started_ns: int) -> MergeResult:
        if address % PAGE_SIZE:
            raise PoolError(f"address {address:#x} is not page aligned")
        if len(data) % PAGE_SIZE:
            raise PoolError(f"{len(data)} bytes of content are not a whole number of pages")
        count = len(data) // PAGE_SIZE
        if count == 0:
            return MergeResult(0, 0, 0, True, 0)
        hash_keys = self.pool._hash_pages(data)  # outside the lock: pure CPU
        admission = self.pool._admit(self.lease_id, data, hash_keys, started_ns)
        if admission is None:
            return MergeResult(count, 0, 0, False, 0)
        self._references += count
        mmaps = self.pool._map_slots(address, admission.slots)
        return MergeResult(count, count - admission.pages_new, admission.pages_new, True, mmaps)

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
        admission = self.pool._admit(self.lease_id, data, self.pool._hash_pages(data), started_ns)
        if admission is None:
            return None
        self._references += len(admission.slots)
        return ReferencedPages(tuple(admission.slots), admission.pages_new)

    def reference_again(self, held: ReferencedPages) -> ReferencedPages | None:
        """Reference, under this lease, pages this process already holds under another
        live lease: a launcher's second VM of an image.  Nothing is hashed, read or
        compared: a slot's bytes cannot change while any reference to it lives, and
        the transaction checks that every slot still does.  None when the run switch
        is off."""
        self._check_usable()
        started_ns = time.thread_time_ns()
        pool = self.pool
        index = pool._store.index
        counts = Counter(held.slots)
        with index.write() as txn:
            if not index.run(txn):
                return None
            lease = index.lease(txn, self.lease_id)
            if lease is None:
                raise PoolError(f"lease {self.lease_id} is gone from the pool of {pool.domain!r}")
            if not index.all_slots_exist(txn, counts):
                raise PoolError("pages to reference again were released meanwhile")
            index.add_references(txn, counts)
            index.add_chunk(txn, lease, held.slots)
            count = len(held.slots)
            index.add_to_counters(
                txn,
                {
                    "pages_scanned": count,
                    "pages_merged": count,
                    "references": count,
                    "merge_cpu_ns": time.thread_time_ns() - started_ns,
                },
            )
        self._references += count
        return ReferencedPages(held.slots, 0)

    def merge(self, address: int, length: int) -> MergeResult:
        """Replace the pages of a populated private region with pool mappings.

        The madvise-like API: the region's current bytes (copied out first, a batch
        at a time) are looked up or stored, then the pool's pages are mapped over the
        region.  Only regions nobody writes meanwhile may be merged: a write between
        the copy and the mapping is lost.
        """
        self._check_usable()
        if address % PAGE_SIZE or length % PAGE_SIZE:
            raise PoolError(f"region {address:#x}+{length:#x} is not whole pages")
        region = view(address, length)
        snapshot = bytearray(min(length, _MERGE_BATCH * PAGE_SIZE))
        pages = merged = new = mmaps = 0
        for offset in range(0, length, len(snapshot) or 1):
            started_ns = time.thread_time_ns()  # the copy is part of the cost
            size = min(len(snapshot), length - offset)
            batch = memoryview(snapshot)[:size]
            batch[:] = region[offset : offset + size]
            result = self._map_pages(address + offset, batch, started_ns)
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
                self.pool._drop_lease(txn, self.lease_id)
        self._released = True
        self._references = 0
        release_store(store)
