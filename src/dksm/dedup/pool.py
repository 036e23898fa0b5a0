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
wrong; :meth:`PagePool.verify` lists the problems (:mod:`dksm.dedup.consistency`)
and :func:`force_purge` removes such a pool without opening its index.

The code is split by job: this module is :class:`PagePool` (open, sweep, hand-over,
counters, verify, purge); :mod:`dksm.dedup.lease` is :class:`Lease`;
:mod:`dksm.dedup.references` holds the write transactions both use;
:mod:`dksm.dedup.admission` decides, on bytes, what a load shares and stores;
:mod:`dksm.dedup.consistency` is the check :meth:`PagePool.verify` runs; the index's
schema is :mod:`dksm.dedup.index`'s alone.

Loading content (:meth:`Lease.map_pages`, :meth:`Lease.merge`) hashes one page in
32 (xxh3-64, before taking the lock), then in one LMDB write transaction looks those
hashes up, predicts that the pages after each one found lie in the slots after its
slot (content is stored a load at a time, in consecutive slots), and compares each
predicted run with the pool's bytes in place.  Only the pages no prediction matched
are hashed and looked up one by one, every hash match confirmed byte for byte too.
The pages still unfound are stored in consecutive slots (first fit among free
ranges, else at the end); each page takes one reference, named in the caller's
lease.  After the commit it maps the slots over the caller's memory, one ``mmap``
per run of consecutive slots.  ``merge`` compares the region itself, in place; only
the pages it stores are copied out first, so what is stored matches its hash.
There is no daemon: reclaim happens when a lease is released, and the leases of dead
processes are swept by whichever process next opens the pool.

Known loads in one step: a load of a whole span (an image's read-only pages) also
gets a *manifest*, keyed by a 128-bit hash of the whole span (xxh3-128, memory speed)
and its page count, naming the slot of each page.  The manifest holds one reference
per page itself, and the loads that use it count one use each under their lease; it
is deleted, its references with it, when its last use is dropped.  A later load of
the same span hashes it once, finds the manifest (a read transaction), compares the
span with the manifest's slots in place, a run of consecutive slots at a time, and
then takes all its references in one write transaction that does not grow with the
span: one more use, if the manifest still has the id it had when compared (ids are
never reused, so it existed throughout and pinned its slots: their bytes are the
ones compared).  Nothing is hashed, looked up or compared page by page.  A key
matching other bytes (a collision, a pages file changed behind the pool's back)
fails the comparison and the load goes page by page.  ``merge`` (the madvise-like
API, over arbitrary memory) always goes page by page.

Invariants
==========

Everything else relies on these:

1. **A lease is written before a slot is mapped.**  The references a process takes
   are recorded under its lease in the same write transaction that takes them, and
   it maps nothing before that transaction commits.  So every mapping of a slot is
   covered by a reference that outlives it; a process killed at any instant leaves
   at worst references without mappings, which the sweep returns.  A use of a
   manifest is such a record: it keeps the manifest, and so the manifest's own
   references to its slots, alive until the lease is dropped.
2. **A slot is freed only inside the write transaction that drops its last
   reference.**  LMDB admits one writer at a time, and a loader takes its
   references inside a write transaction, so no loader can find (let alone map) a
   slot in the window between its count reaching zero and its page being punched
   out of the file.  Exact counts matter because punching a hole in a tmpfs file
   unmaps those pages from every private mapping that has not copied them: one
   reference too few and a live VM suddenly reads zeros.
3. **Bytes are compared before a page is shared.**  A hash match (or a predicted
   slot) is only a candidate; it is confirmed against the pages file byte for byte,
   and a mismatch stores the page in a new slot (counted in ``merging_failed`` when
   the hash matched).  A weak or colliding hash costs time, never correctness.
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

import os
from collections.abc import Callable
from types import TracebackType

import xxhash

from dksm.dedup import references
from dksm.dedup.index import LeaseRecord
from dksm.dedup.lease import Lease
from dksm.dedup.owner import ProcessIdentity
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
from dksm.memory.host_mapping import PAGE_SIZE
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Self

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
    "span_key",
    "validate_domain",
]

PageHash = Callable[[memoryview], int]
"""A page's 64-bit hash.  Pools are shared, so every opener must use the same one."""
SpanHash = Callable[[memoryview], int]
"""A whole load's 128-bit hash (the key of its manifest); the same for every opener."""
_SPAN_HASH_MASK = (1 << 128) - 1


def page_key(page: bytes | memoryview) -> bytes:
    """The key under which a pool with the default hash (xxh3-64) indexes ``page``:
    what a caller compares with :meth:`PagePool.held_keys` to learn, without
    loading anything, which of its pages a pool already holds."""
    return xxhash.xxh3_64_digest(page)  # the big-endian bytes of the 64-bit hash


def span_key(data: bytes | memoryview) -> bytes:
    """The key of the manifest of a load of ``data`` (whole pages) in a pool with the
    default hash: xxh3-128 of all of it (memory speed) and its page count."""
    return xxhash.xxh3_128_digest(data) + (len(data) // PAGE_SIZE).to_bytes(8, "big")


class PoolStats(Value):
    """The pool's counters, named as in the DKSM thesis (``/sys/kernel/mm/dksm``)."""

    # In the order `dksm pool stats` prints them (the thesis's), not sorted.
    __slots__ = (  # noqa: RUF023
        "pages_scanned",
        "pages_merged",
        "merging_failed",
        "hashtable_entries",
        "leases",
        "references",
        "pages_saved",
        "bytes_saved",
        "file_blocks_bytes",
        "run",
        "merge_cpu_ns",
        "hashtable_size",
        "manifests",
        "manifest_pages",
    )

    def __init__(
        self,
        # pages offered to the pool while it ran
        pages_scanned: int,
        # pages that matched a page already in the pool
        pages_merged: int,
        # pages whose hash matched but bytes differed
        merging_failed: int,
        # distinct pages in the pool (slots in use)
        hashtable_entries: int,
        leases: int,
        # sum of all slots' reference counts
        references: int,
        # references - hashtable_entries
        pages_saved: int,
        bytes_saved: int,
        # storage the pages file holds (st_blocks * 512)
        file_blocks_bytes: int,
        run: bool,
        # CPU time the loading threads of every process spent hashing, comparing and
        # storing pages (mapping excluded): dksm's counterpart of ksmd's CPU time.
        merge_cpu_ns: int = 0,
        # Slots the pages file spans, in use or free: the size of the pool's page table
        # (the thesis's is its kernel hash table's bucket count; see docs/THESIS.md).
        hashtable_size: int = 0,
        # Loads the pool knows whole (their manifests), and the pages referenced through
        # one with no per-page work (a subset of pages_merged).
        manifests: int = 0,
        manifest_pages: int = 0,
    ) -> None:
        self.pages_scanned = pages_scanned
        self.pages_merged = pages_merged
        self.merging_failed = merging_failed
        self.hashtable_entries = hashtable_entries
        self.leases = leases
        self.references = references
        self.pages_saved = pages_saved
        self.bytes_saved = bytes_saved
        self.file_blocks_bytes = file_blocks_bytes
        self.run = run
        self.merge_cpu_ns = merge_cpu_ns
        self.hashtable_size = hashtable_size
        self.manifests = manifests
        self.manifest_pages = manifest_pages

    def to_json(self) -> dict[str, int | bool]:
        return {name: getattr(self, name) for name in self.__slots__}


class LeaseInfo(Value):
    """One lease as the index records it."""

    __slots__ = ("alive", "lease_id", "pid", "references", "start_time")

    def __init__(
        self,
        lease_id: int,
        pid: int,
        start_time: int,
        references: int,
        alive: bool,
    ) -> None:
        self.lease_id = lease_id
        self.pid = pid
        self.start_time = start_time
        self.references = references
        self.alive = alive


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


class PagePool:
    """One sharing domain's page pool, open in this process.  Use :meth:`open`."""

    def __init__(
        self,
        store: Store,
        domain: str,
        page_hash: PageHash | None,
        span_hash: SpanHash | None = None,
    ) -> None:
        self._store = store
        self.domain = domain
        self._closed = False
        self._hash_key: Callable[[memoryview], bytes]
        if page_hash is None:
            self._hash_key = xxhash.xxh3_64_digest  # page_key, without the extra call
        else:
            custom = page_hash
            self._hash_key = lambda page: (custom(page) & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "big")
        self.span_key: Callable[[memoryview], bytes]
        if span_hash is None:
            self.span_key = span_key
        else:
            whole = span_hash
            self.span_key = lambda data: (
                (whole(data) & _SPAN_HASH_MASK).to_bytes(16, "big")
                + (len(data) // PAGE_SIZE).to_bytes(8, "big")
            )

    @property
    def directory(self) -> Path:
        """The domain's pool directory (as given, not resolved)."""
        from pathlib import Path  # milliseconds of start-up: only for callers that ask

        return Path(self._store.directory)

    @classmethod
    def open(
        cls,
        domain: str = DEFAULT_DOMAIN,
        root: str | os.PathLike[str] | None = None,
        *,
        page_hash: PageHash | None = None,
        span_hash: SpanHash | None = None,
        sweep: bool = True,
        create: bool = True,
    ) -> PagePool:
        """Open (creating if needed) a domain's pool and sweep the leases of dead owners.

        ``page_hash`` replaces xxh3-64, e.g. with a deliberately weak hash in tests, and
        ``span_hash`` the xxh3-128 that keys manifests (the same for every opener);
        ``sweep=False`` leaves the sweep to an explicit :meth:`sweep` call;
        ``create=False`` raises :class:`PoolMissingError` instead of creating a pool.
        A pool (or a way to it) that another user could change is refused
        (:mod:`dksm.dedup.trust`), and so is one whose files are damaged
        (:class:`PoolDamagedError`).
        """
        store = acquire_store(domain, root, create=create)
        pool = cls(store, domain, page_hash, span_hash)
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
                    references.drop_lease(store, txn, record.lease_id)
                    swept += 1
            references.punch_leftovers(store, txn)
        return swept

    # -- loading -----------------------------------------------------------------------

    def hash_keys(self, data: memoryview, every: int = 1) -> list[bytes]:
        """The index key (hash) of each page of ``data`` (or of pages 0, ``every``,
        2 * ``every`` ...), as every opener computes it."""
        key = self._hash_key
        step = every * PAGE_SIZE
        return [key(data[offset : offset + PAGE_SIZE]) for offset in range(0, len(data), step)]

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

    def held_keys(self) -> frozenset[bytes]:
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
            end = store.index.end(txn)
            manifests = store.index.manifest_count(txn)
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
            hashtable_size=end,
            manifests=manifests,
            manifest_pages=counters["manifest_pages"],
        )

    def verify(self, *, check_hashes: bool = True) -> list[str]:
        """Check the index against itself and the pages file; return the problems found.

        Runs inside a write transaction (then aborted) so no writer changes the file
        meanwhile.  An empty list means the pool is consistent.
        """
        from dksm.dedup import consistency  # not for every VM start: its own command's

        store = self._usable_store()
        with store.index.inspect() as txn:
            try:
                hash_key = self._hash_key if check_hashes else None
                key_of_span = self.span_key if check_hashes else None
                return list(
                    consistency.problems(store.index, store.pages, txn, hash_key, key_of_span)
                )
            except PoolDamagedError as error:  # a record too broken to read on
                return [str(error)]

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
