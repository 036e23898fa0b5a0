"""The page pool's index: its LMDB schema and every read and write of it.

LMDB fits the pool's access pattern: many processes read concurrently without
locks, one writer at a time holds a process-shared robust mutex (a writer killed
mid-transaction loses its transaction and nothing else), and the whole database
is a memory map, so a lookup costs no system call.  This module owns the byte
layout; :mod:`dksm.dedup.pool` owns what the records mean for page sharing.

Schema, format 3 (every integer is an unsigned 64-bit big-endian number, so that
LMDB's byte order of keys is their numeric order, except the counts of slot blocks):

``meta``
    ``format`` -> ``b"3"``, ``page_size`` -> ``b"4096"``, ``layout`` -> :data:`LAYOUT`
    (ASCII), ``run`` -> ``b"1"`` or ``b"0"``, ``next_lease`` -> u64 (the next lease
    id), ``next_manifest`` -> u64 (the next manifest id), ``end`` -> u64 (slots
    ``[0, end)`` exist in the pages file: each is either in use (``slot_counts``) or
    inside one ``free`` range).
``counters``
    counter name (ASCII) -> u64: :data:`COUNTERS`.
``hashes`` (sorted duplicates of fixed size)
    page hash (8 bytes) -> slot, one duplicate per slot holding a page with that
    hash; several only after a hash collision.
``slot_counts``
    block number -> the reference count of each of the block's :data:`SLOT_BLOCK`
    slots (slot ``block * SLOT_BLOCK + i`` is the i-th), little-endian u64s: 0 for a
    slot not in use.  A block with no slot in use has no record.  Counts are kept a
    block to a record because loads reference runs of consecutive slots: thousands
    of references change a handful of records (:class:`SlotBlocks`).
``slot_hashes``
    block number -> the page hash (8 bytes) of each of the block's slots, zeros for
    a slot not in use; recorded exactly for the blocks ``slot_counts`` records.
``leases``
    lease id -> owner pid || owner start time || owner pid namespace (inode) ||
    references held (its chunks' lengths plus, for each use of a manifest, the
    manifest's length).
``lease_slots``
    lease id || chunk number -> the slots of one load call, one u64 per reference
    (a slot appears as often as the lease references it).  A chunk's number is the
    lease's reference count before it, so numbers grow and never repeat.
``manifests``
    span key (:data:`SPAN_KEY_SIZE` bytes: a 128-bit hash of a load's whole content
    || its page count) -> manifest id (u64, never reused) || the slot of each page
    (one u64 per page).  A manifest holds one reference per page to its slots
    itself, so they keep their bytes for as long as it exists.
``manifest_users``
    span key -> how many uses of the manifest leases hold (u64, never 0: a manifest
    whose last use is dropped is deleted, its references with it).
``lease_manifests``
    lease id || span key -> how many times the lease uses that manifest (u64).
``free``
    first slot of a free range -> its length.  Ranges are disjoint, never adjacent
    (adjacent ones are coalesced) and never touch ``end`` (the end moves down
    instead), so an empty pool has no free range and ``end`` 0.

Opening the environment
=======================

LMDB opens its two files (``data.mdb``, ``lock.mdb``) by path, following symlinks,
and creates them if missing; the pool must not let anyone choose what those paths
reach (:mod:`dksm.dedup.trust`).  So:

1. The caller hands over a descriptor of the ``index`` directory it opened and
   checked, and LMDB is given ``/proc/self/fd/N`` of that descriptor as its path.
   Resolving that path lands in exactly the directory that was checked, whatever has
   been renamed or replaced since: the pool root, the domain directory and the index
   directory cannot be swapped under LMDB.  Inside that directory only the owner can
   make names (it is the owner's and nobody else may write it).
2. Before LMDB runs, both files are opened here with ``O_NOFOLLOW`` relative to the
   directory descriptor and checked (a regular file of the owner's, one link), or
   created exclusively when the pool is new, so LMDB never creates a file itself.
   The data file is validated (:mod:`dksm.dedup.index_file`) before LMDB maps it.
   These descriptors are closed before LMDB opens the files (closing one later
   would drop the fcntl locks LMDB holds on ``lock.mdb``: they are per process);
   what was checked is remembered by device and inode.
3. After ``lmdb.open`` returns, the descriptors LMDB opened (those new in
   ``/proc/self/fd``) must include the very files checked in step 2, compared by
   device and inode: had a name been replaced between the check and LMDB's open,
   LMDB would hold another file and the environment is closed again and refused.

Damage
======

An index that contradicts itself (a lease naming a slot the index lacks, a record of
the wrong size, LMDB reporting a corrupted page) raises :class:`PoolDamagedError`,
whose message names the problem and ends with the caller's hint on how to inspect
or remove the pool, never a ``KeyError`` or ``struct.error``.

Why one module over 500 lines: this is the only module that uses LMDB (checked by
``tests/test_layering.py``), so every record's layout and every transaction's
access to it are in one place, beside the schema that explains them.
"""

from __future__ import annotations

import array
import contextlib
import os
import struct
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import lmdb

from dksm.dedup import slot_arrays, trust
from dksm.dedup.index_file import data_file_problem
from dksm.dedup.pool_errors import PoolDamagedError, PoolError
from dksm.error import DksmError
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Final, TypeAlias

Transaction: TypeAlias = "lmdb.Transaction[bytes]"
"""A transaction on the index, as this module's context managers give it: callers
only hand it back to :class:`PoolIndex`'s methods, so LMDB is used here alone."""

FORMAT_VERSION: Final = 3
LAYOUT: Final = (
    "meta counters hashes:dupsort,dupfixed slot_counts slot_hashes leases lease_slots free "
    "manifests manifest_users lease_manifests"
)
COUNTERS: Final = (
    "pages_scanned",
    "pages_merged",
    "merging_failed",
    "references",
    "merge_cpu_ns",
    "manifest_pages",
)
SPAN_KEY_SIZE: Final = 24
# Slots are counted and named a block at a time: a load of thousands of pages in
# consecutive slots changes a few records, not one per page.
SLOT_BLOCK: Final = 512

# The index holds a few dozen bytes per slot and per reference; 1 GiB of address
# space (sparse on tmpfs) is room for tens of millions of pages.
MAP_SIZE: Final = 1 << 30
# LMDB's reader table is sized once, by whoever creates the lock file.  One slot per
# process with a read transaction open: room for a thousand VMM processes and more.
MAX_READERS: Final = 4096
MAX_DBS: Final = 16

_U64 = struct.Struct(">Q")
_LEASE_RECORD = struct.Struct(">QQQQ")
_HASH_SIZE = 8
_COUNTS_BLOCK_SIZE = SLOT_BLOCK * 8
_HASHES_BLOCK_SIZE = SLOT_BLOCK * _HASH_SIZE
_ZERO_HASHES = bytes(_HASHES_BLOCK_SIZE)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def from_u64(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


DATA_FILE: Final = "data.mdb"
LOCK_FILE: Final = "lock.mdb"

# LMDB's own verdicts on a file that is not what it wrote.
_DAMAGE_ERRORS = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.IncompatibleError,
    lmdb.BadValsizeError,
)


class PoolIndexError(PoolError):
    """The pool's index cannot be read or written (LMDB's error is in the message)."""


class LeaseRecord(Value):
    __slots__ = ("lease_id", "pid", "pid_namespace", "references", "start_time")

    def __init__(
        self,
        lease_id: int,
        pid: int,
        start_time: int,
        # inode of /proc/PID/ns/pid: pids mean something only inside it
        pid_namespace: int,
        references: int,
    ) -> None:
        self.lease_id = lease_id
        self.pid = pid
        self.start_time = start_time
        self.pid_namespace = pid_namespace
        self.references = references


class ManifestRecord(Value):
    """A load's whole content known to the pool: the slot of each of its pages."""

    __slots__ = ("key", "manifest_id", "slots")

    def __init__(
        self,
        key: bytes,
        manifest_id: int,
        slots: array.array[int],
    ) -> None:
        self.key = key
        self.manifest_id = manifest_id
        self.slots = slots


class SlotRecord(Value):
    __slots__ = ("page_hash", "references", "slot")

    def __init__(
        self,
        slot: int,
        page_hash: bytes,
        references: int,
    ) -> None:
        self.slot = slot
        self.page_hash = page_hash
        self.references = references


def _fix_for(path: str) -> str:
    return f"remove the pool directory {os.path.dirname(path)}"


def _open_environment(
    dir_fd: int, path: str, hint: str, *, create: bool, readonly: bool = False
) -> lmdb.Environment:
    """Open the LMDB environment in the checked directory ``dir_fd`` (see the module
    documentation, "Opening the environment").  ``path`` is for messages only."""
    fix = _fix_for(path)
    names = (DATA_FILE,) if readonly else (DATA_FILE, LOCK_FILE)
    # Each file is checked through a descriptor that is closed again *before* LMDB
    # opens it: LMDB keeps POSIX (fcntl) locks on lock.mdb, which belong to the
    # process, and closing any other descriptor of that file would drop them.  The
    # file is recognised afterwards by its device and inode.
    expected: set[trust.FileIdentity] = set()
    for name in names:
        if create:
            fd = trust.create_file(dir_fd, name, os.path.join(path, name))
        else:
            flags = os.O_RDONLY if name == DATA_FILE else os.O_RDWR | os.O_CREAT
            try:
                fd = trust.open_file(dir_fd, name, flags, os.path.join(path, name), fix)
            except FileNotFoundError:
                raise PoolDamagedError(
                    f"the pool index at {path} has no {name}: the pool is damaged; {hint}"
                ) from None
        try:
            expected.add(trust.identity(fd))
            if name == DATA_FILE and not create:
                empty = os.fstat(fd).st_size == 0
                problem = "it is empty" if empty else data_file_problem(fd)
                if problem is not None:
                    raise PoolDamagedError(
                        f"the pool is damaged: its index file {os.path.join(path, name)} cannot "
                        f"be opened because {problem}; {hint}"
                    )
        finally:
            os.close(fd)
    before = trust.open_descriptors()
    try:
        env = lmdb.open(
            f"/proc/self/fd/{dir_fd}",
            map_size=MAP_SIZE,
            max_dbs=MAX_DBS,
            max_readers=MAX_READERS,
            subdir=True,
            create=False,
            readonly=readonly,
            lock=not readonly,
            # tmpfs does not outlive the host, so syncing buys nothing: a committed
            # transaction is in the shared page cache, visible to every process.
            sync=False,
            metasync=False,
            readahead=False,
            mode=trust.FILE_MODE,
        )
    except _DAMAGE_ERRORS as error:
        raise PoolDamagedError(
            f"the pool index at {path} cannot be opened ({error}): the pool is damaged; {hint}"
        ) from error
    except lmdb.Error as error:
        raise PoolIndexError(f"the pool index at {path} cannot be opened: {error}") from error
    opened = {file for _, file in trust.open_descriptors() - before}
    if not expected <= opened:
        env.close()
        raise trust.UntrustedPathError(
            f"the pool index files in {path} changed while LMDB opened them: another "
            f"process writes this pool directory; {fix}"
        )
    return env


def stored_format(dir_fd: int, path: str, hint: str) -> str | None:
    """The format recorded by an index nobody has open (the caller holds the pool's
    lock exclusively), or None if it records none: an index a creation left half-made."""
    with contextlib.closing(
        _open_environment(dir_fd, path, hint, create=False, readonly=True)
    ) as env:
        try:
            with env.begin() as txn:
                if txn.get(b"meta") is None:
                    return None
            meta = env.open_db(b"meta", create=False)
            with env.begin() as txn:
                version = txn.get(b"format", db=meta)
        except _DAMAGE_ERRORS as error:
            raise PoolDamagedError(
                f"the pool index at {path} cannot be read ({error}): the pool is damaged; {hint}"
            ) from error
        except lmdb.Error as error:
            raise PoolIndexError(f"the pool index at {path} cannot be read: {error}") from error
    return None if version is None else bytes(version).decode("ascii", "replace")


def pack_slots(slots: Sequence[int]) -> bytes:
    if isinstance(slots, array.array) and slots.itemsize == 8:
        packed = array.array("Q")
        packed.frombytes(memoryview(slots).cast("B"))  # never negative; read in place
    else:
        packed = array.array("Q", slots)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes()


def unpack_slots(raw: bytes) -> array.array[int]:
    """The slots of a lease chunk; ValueError if ``raw`` is not whole u64s."""
    unpacked = array.array("Q")
    unpacked.frombytes(raw)
    if sys.byteorder == "little":
        unpacked.byteswap()
    return unpacked


class PoolIndex:
    """One process's handle on a pool's LMDB environment.

    LMDB forbids opening one environment twice in a process (its fcntl locks are
    per process), so the pool keeps one ``PoolIndex`` per process and domain.
    """

    def __init__(
        self, dir_fd: int, path: str | os.PathLike[str], *, create: bool, hint: str
    ) -> None:
        """Open the environment in the checked directory ``dir_fd`` (which this object
        then owns and closes).  ``path`` names it in messages; ``hint`` ends every
        damage message (how to inspect or remove the pool)."""
        self.path = path = os.fspath(path)
        self.hint = hint
        self.dir_fd = dir_fd
        try:
            self.env = _open_environment(dir_fd, path, hint, create=create)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            # Each table handle is opened in a transaction of its own: LMDB keeps
            # handles opened inside a read-only transaction only for that transaction.
            self.meta = self.env.open_db(b"meta", create=create)
            self.counters = self.env.open_db(b"counters", create=create)
            self.hashes = self.env.open_db(b"hashes", create=create, dupsort=True, dupfixed=True)
            self.slot_counts = self.env.open_db(b"slot_counts", create=create)
            self.slot_hashes = self.env.open_db(b"slot_hashes", create=create)
            self.leases = self.env.open_db(b"leases", create=create)
            self.lease_slots = self.env.open_db(b"lease_slots", create=create)
            self.free = self.env.open_db(b"free", create=create)
            self.manifests = self.env.open_db(b"manifests", create=create)
            self.manifest_users = self.env.open_db(b"manifest_users", create=create)
            self.lease_manifests = self.env.open_db(b"lease_manifests", create=create)
        except lmdb.NotFoundError as error:
            older = self._older_format()
            self.close()
            if older is not None:  # tables a later format added: not damage
                raise PoolError(
                    f"the pool at {os.path.dirname(path)} has format {older}, and this dksm "
                    f"reads only format {FORMAT_VERSION}; {hint}"
                ) from error
            raise PoolDamagedError(
                f"the pool index at {path} lacks a table ({error}): the pool is damaged; {hint}"
            ) from error
        except lmdb.Error as error:
            self.close()
            raise self._failure("opened", error) from error
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.env.close()
        os.close(self.dir_fd)

    def _older_format(self) -> str | None:
        """The format an index records, if it is another than this dksm's."""
        try:
            meta = self.env.open_db(b"meta", create=False)
            with self.env.begin() as txn:
                raw = txn.get(b"format", db=meta)
        except lmdb.Error:
            return None
        version = None if raw is None else bytes(raw).decode("ascii", "replace")
        return version if version not in (None, str(FORMAT_VERSION)) else None

    def _failure(self, action: str, error: lmdb.Error) -> DksmError:
        """LMDB's error as a sentence: damage, a full tmpfs, or anything else."""
        if isinstance(error, _DAMAGE_ERRORS):
            return PoolDamagedError(
                f"the pool index at {self.path} cannot be {action} ({error}): the pool is "
                f"damaged; {self.hint}"
            )
        if isinstance(error, lmdb.MapFullError) or (
            isinstance(error, lmdb.DiskError) and "No space" in str(error)
        ):
            return PoolIndexError(
                f"the pool index at {self.path} cannot be {action}: the tmpfs holding the "
                f"pool is full ({error})"
            )
        return PoolIndexError(f"the pool index at {self.path} cannot be {action}: {error}")

    def damaged(self, problem: str) -> PoolDamagedError:
        """The error for an index that contradicts itself."""
        return PoolDamagedError(f"the pool index at {self.path} is damaged: {problem}; {self.hint}")

    @contextlib.contextmanager
    def read(self) -> Iterator[Transaction]:
        try:
            with self.env.begin() as txn:
                yield txn
        except lmdb.Error as error:
            raise self._failure("read", error) from error

    @contextlib.contextmanager
    def write(self) -> Iterator[Transaction]:
        """A write transaction: commits when its ``with`` block ends, aborts on error.

        LMDB's own errors (a full tmpfs, above all) become :class:`PoolIndexError`,
        a sentence for the user; the aborted transaction changed nothing."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.Error as error:
            raise self._failure("written", error) from error

    @contextlib.contextmanager
    def inspect(self) -> Iterator[Transaction]:
        """A write transaction that is always aborted: a view no writer changes
        meanwhile (the pages file included, since it changes only under this lock)."""
        try:
            txn = self.env.begin(write=True)
        except lmdb.Error as error:
            raise self._failure("read", error) from error
        try:
            yield txn
        except lmdb.Error as error:
            raise self._failure("read", error) from error
        finally:
            txn.abort()

    def reader_check(self) -> None:
        """Free the reader slots of dead processes (they pin old pages)."""
        try:
            self.env.reader_check()
        except lmdb.Error as error:
            raise self._failure("read", error) from error

    # -- meta ------------------------------------------------------------------------

    def initialise(self, txn: Transaction, page_size: int) -> None:
        txn.put(b"format", str(FORMAT_VERSION).encode(), db=self.meta)
        txn.put(b"page_size", str(page_size).encode(), db=self.meta)
        txn.put(b"layout", LAYOUT.encode(), db=self.meta)
        txn.put(b"run", b"1", db=self.meta)
        txn.put(b"next_lease", u64(1), db=self.meta)
        txn.put(b"next_manifest", u64(1), db=self.meta)
        txn.put(b"end", u64(0), db=self.meta)
        for name in COUNTERS:
            txn.put(name.encode(), u64(0), db=self.counters)

    def meta_text(self, txn: Transaction, key: str) -> str | None:
        raw = txn.get(key.encode(), db=self.meta)
        return None if raw is None else raw.decode("ascii", "replace")

    def run(self, txn: Transaction) -> bool:
        return txn.get(b"run", db=self.meta) == b"1"

    def set_run(self, txn: Transaction, run: bool) -> None:
        txn.put(b"run", b"1" if run else b"0", db=self.meta)

    def end(self, txn: Transaction) -> int:
        return from_u64(txn.get(b"end", b"", db=self.meta))

    # -- counters --------------------------------------------------------------------

    def read_counters(self, txn: Transaction) -> dict[str, int]:
        return {name: from_u64(txn.get(name.encode(), b"", db=self.counters)) for name in COUNTERS}

    def add_to_counters(self, txn: Transaction, deltas: dict[str, int]) -> None:
        for name, delta in deltas.items():
            if delta:
                key = name.encode()
                value = from_u64(txn.get(key, b"", db=self.counters)) + delta
                if value < 0:
                    raise self.damaged(f"its {name} counter would fall below zero")
                txn.put(key, u64(value), db=self.counters)

    def entries(self, txn: Transaction) -> tuple[int, int]:
        """(distinct pages, leases): LMDB keeps both counts, no scan needed."""
        return txn.stat(self.hashes)["entries"], txn.stat(self.leases)["entries"]

    # -- lookups ---------------------------------------------------------------------

    def first_slots(self, txn: Transaction, hash_keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """For each hash present, its lowest slot (one batched lookup in C)."""
        return dict(txn.cursor(db=self.hashes).getmulti(hash_keys))

    def slots_with_hash(self, txn: Transaction, hash_key: bytes) -> list[int]:
        cursor = txn.cursor(db=self.hashes)
        if not cursor.set_key(hash_key):
            return []
        return [from_u64(raw) for raw in cursor.iternext_dup()]

    # -- references ------------------------------------------------------------------

    def slot_blocks(self, txn: Transaction) -> SlotBlocks:
        """The slots' counts and hashes as ``txn`` changes them (write them back with
        :meth:`SlotBlocks.flush` before the transaction ends)."""
        return SlotBlocks(self, txn)

    def all_slots_exist(self, txn: Transaction, slots: Iterable[int]) -> bool:
        blocks = self.slot_blocks(txn)
        return all(blocks.count(slot) for slot in slots)

    def add_references(self, txn: Transaction, counts: dict[int, int]) -> None:
        """Raise the reference counts of existing slots."""
        blocks = self.slot_blocks(txn)
        for slot, count in counts.items():
            blocks.add(slot, count)
        blocks.flush()

    def add_slots(
        self, txn: Transaction, first: int, hash_keys: Sequence[bytes], counts: dict[int, int]
    ) -> None:
        """Record new slots ``first, first+1, ...`` holding pages with these hashes."""
        blocks = self.slot_blocks(txn)
        blocks.create(first, hash_keys, [counts[first + i] for i in range(len(hash_keys))])
        blocks.flush()

    def drop_references(self, txn: Transaction, counts: dict[int, int]) -> list[int]:
        """Lower reference counts; delete the slots that reach zero and return them."""
        blocks = self.slot_blocks(txn)
        freed = blocks.drop(counts)
        blocks.flush()
        return freed

    def slot_records(self, txn: Transaction) -> Iterator[SlotRecord]:
        """Every slot in use, in slot order."""
        hashes = txn.cursor(db=self.slot_hashes)
        for key, raw in txn.cursor(db=self.slot_counts):
            block = self._block_number(key)
            counts = self._counts_block(block, raw)
            raw_hashes = hashes.get(key)
            if raw_hashes is None or len(raw_hashes) != _HASHES_BLOCK_SIZE:
                raise self.damaged(f"slot block {block} has counts but no hashes")
            for offset, references in enumerate(counts):
                if references:
                    at = offset * _HASH_SIZE
                    yield SlotRecord(
                        block * SLOT_BLOCK + offset, bytes(raw_hashes[at : at + _HASH_SIZE]),
                        references,
                    )  # fmt: skip

    def slot_block_problems(self, txn: Transaction) -> Iterator[str]:
        """Blocks recorded for no slot in use, or with hashes but no counts."""
        for key, raw in txn.cursor(db=self.slot_counts):
            block = self._block_number(key)
            if not any(self._counts_block(block, raw)):
                yield f"slot block {block} is recorded although none of its slots is in use"
        for key in txn.cursor(db=self.slot_hashes).iternext(values=False):
            if txn.get(key, db=self.slot_counts) is None:
                yield f"slot block {self._block_number(key)} has hashes but no counts"

    def _block_number(self, key: bytes) -> int:
        if len(key) != _U64.size:
            raise self.damaged(f"a slot block has a key of {len(key)} bytes")
        return from_u64(key)

    def _counts_block(self, block: int, raw: bytes) -> array.array[int]:
        if len(raw) != _COUNTS_BLOCK_SIZE:
            raise self.damaged(f"slot block {block} has counts of {len(raw)} bytes")
        counts = array.array("Q")
        counts.frombytes(raw)
        if sys.byteorder == "big":
            counts.byteswap()
        return counts

    def hash_entries(self, txn: Transaction) -> Iterator[tuple[bytes, int]]:
        for page_hash, slot in txn.cursor(db=self.hashes):
            yield page_hash, from_u64(slot)

    # -- slot allocation -------------------------------------------------------------

    def allocate(self, txn: Transaction, count: int) -> tuple[int, bool]:
        """Reserve ``count`` consecutive slots: (first slot, whether taken at the end).

        First fit among the free ranges, else at the end: an image seen for the first
        time lands in one run and maps with one mmap.
        """
        cursor = txn.cursor(db=self.free)
        for key, raw_length in cursor:
            length = from_u64(raw_length)
            if length >= count:
                start = from_u64(key)
                txn.delete(key, db=self.free)
                if length > count:
                    txn.put(u64(start + count), u64(length - count), db=self.free)
                return start, False
        end = self.end(txn)
        txn.put(b"end", u64(end + count), db=self.meta)
        return end, True

    def release_runs(self, txn: Transaction, runs: Sequence[tuple[int, int]]) -> None:
        """Return runs of slots (first, length) to the free ranges, coalescing."""
        cursor = txn.cursor(db=self.free)
        for run_start, run_length in runs:
            start, length = run_start, run_length
            if cursor.set_range(u64(start + length)) and from_u64(cursor.key()) == start + length:
                length += from_u64(cursor.value())
                cursor.delete()
            # The range just below: the one before the first key >= start, or the
            # last one when no key is that high.
            has_before = cursor.prev() if cursor.set_range(u64(start)) else cursor.last()
            if has_before:
                before, before_length = from_u64(cursor.key()), from_u64(cursor.value())
                if before + before_length == start:
                    cursor.delete()
                    start, length = before, before_length + length
            txn.put(u64(start), u64(length), db=self.free)
        # The end moves down over a free range touching it, so free space at the top
        # is not a range at all.  Coalescing leaves at most one such range.
        if cursor.last():
            start, length = from_u64(cursor.key()), from_u64(cursor.value())
            if start + length == self.end(txn):
                cursor.delete()
                txn.put(b"end", u64(start), db=self.meta)

    def free_ranges(self, txn: Transaction) -> list[tuple[int, int]]:
        return [(from_u64(key), from_u64(length)) for key, length in txn.cursor(db=self.free)]

    # -- leases ----------------------------------------------------------------------

    def new_lease(self, txn: Transaction, pid: int, start_time: int, pid_namespace: int) -> int:
        lease_id = from_u64(txn.get(b"next_lease", b"", db=self.meta))
        txn.put(b"next_lease", u64(lease_id + 1), db=self.meta)
        record = _LEASE_RECORD.pack(pid, start_time, pid_namespace, 0)
        txn.put(u64(lease_id), record, db=self.leases)
        return lease_id

    def set_lease_owner(
        self, txn: Transaction, lease: LeaseRecord, pid: int, start_time: int
    ) -> None:
        record = _LEASE_RECORD.pack(pid, start_time, lease.pid_namespace, lease.references)
        txn.put(u64(lease.lease_id), record, db=self.leases)

    def lease(self, txn: Transaction, lease_id: int) -> LeaseRecord | None:
        raw = txn.get(u64(lease_id), db=self.leases)
        if raw is None:
            return None
        return self._lease_record(lease_id, raw)

    def lease_records(self, txn: Transaction) -> list[LeaseRecord]:
        return [self._lease_record(from_u64(key), raw) for key, raw in txn.cursor(db=self.leases)]

    def _lease_record(self, lease_id: int, raw: bytes) -> LeaseRecord:
        if len(raw) != _LEASE_RECORD.size:
            raise self.damaged(f"lease {lease_id} has a record of {len(raw)} bytes")
        return LeaseRecord(lease_id, *_LEASE_RECORD.unpack(raw))

    def _chunk(self, key: bytes, raw: bytes) -> array.array[int]:
        if len(key) != 16 or len(raw) % _U64.size:
            raise self.damaged(f"lease {from_u64(key[:8])} has a chunk record of {len(raw)} bytes")
        return unpack_slots(raw)

    def add_chunk(self, txn: Transaction, lease: LeaseRecord, slots: Sequence[int]) -> None:
        """Give the lease one reference to each of ``slots`` (repeats included)."""
        key = u64(lease.lease_id)
        txn.put(key + u64(lease.references), pack_slots(slots), db=self.lease_slots)
        references = lease.references + len(slots)
        record = _LEASE_RECORD.pack(lease.pid, lease.start_time, lease.pid_namespace, references)
        txn.put(key, record, db=self.leases)

    def lease_chunks(
        self, txn: Transaction, lease_id: int
    ) -> Iterator[tuple[int, array.array[int]]]:
        prefix = u64(lease_id)
        cursor = txn.cursor(db=self.lease_slots)
        if not cursor.set_range(prefix):
            return
        for key, raw in cursor:
            if key[:8] != prefix:
                return
            yield from_u64(key[8:]), self._chunk(key, raw)

    def lease_ids_with_chunks(self, txn: Transaction) -> set[int]:
        return {from_u64(key[:8]) for key in txn.cursor(db=self.lease_slots).iternext(values=False)}

    def remove_lease(self, txn: Transaction, lease_id: int) -> tuple[Counter[int], int]:
        """Delete a lease, its chunks and its uses of manifests (deleting the manifests
        it was the last user of); return how often each slot loses a reference, and
        how many references the lease held."""
        counts: Counter[int] = Counter()
        prefix = u64(lease_id)
        record = self.lease(txn, lease_id)
        held = 0
        cursor = txn.cursor(db=self.lease_slots)
        positioned = cursor.set_range(prefix)
        while positioned and cursor.key()[:8] == prefix:
            chunk = self._chunk(cursor.key(), cursor.value())
            counts.update(chunk)
            held += len(chunk)
            cursor.delete()  # moves on to the next record, or unpositions at the end
            positioned = bool(cursor.key())
        cursor = txn.cursor(db=self.lease_manifests)
        positioned = cursor.set_range(prefix)
        while positioned and cursor.key()[:8] == prefix:
            key, uses = bytes(cursor.key()[8:]), self._count(cursor.key(), cursor.value())
            manifest = self.manifest(txn, key)
            users = self.manifest_use_count(txn, key)
            if manifest is None or users < uses:
                raise self.damaged(
                    f"lease {lease_id} uses manifest {key.hex()} {uses} time(s), which "
                    f"{'does not exist' if manifest is None else f'counts {users} use(s)'}"
                )
            held += uses * len(manifest.slots)
            if users == uses:
                counts.update(manifest.slots)
                txn.delete(key, db=self.manifests)
                txn.delete(key, db=self.manifest_users)
            else:
                txn.put(key, u64(users - uses), db=self.manifest_users)
            cursor.delete()
            positioned = bool(cursor.key())
        txn.delete(prefix, db=self.leases)
        return counts, held if record is None else record.references

    # -- manifests -------------------------------------------------------------------

    def _count(self, key: bytes, raw: bytes) -> int:
        if len(raw) != _U64.size:
            raise self.damaged(f"record {bytes(key).hex()} holds {len(raw)} bytes, not a count")
        return from_u64(raw)

    def manifest(self, txn: Transaction, key: bytes) -> ManifestRecord | None:
        raw = txn.get(key, db=self.manifests)
        if raw is None:
            return None
        return self._manifest_record(key, raw)

    def _manifest_record(self, key: bytes, raw: bytes) -> ManifestRecord:
        if len(key) != SPAN_KEY_SIZE or len(raw) < _U64.size or len(raw) % _U64.size:
            raise self.damaged(f"manifest {bytes(key).hex()} has a record of {len(raw)} bytes")
        slots = unpack_slots(raw[_U64.size :])
        if len(slots) != from_u64(key[16:]):
            raise self.damaged(
                f"manifest {bytes(key).hex()} names {len(slots)} slots for "
                f"{from_u64(key[16:])} pages"
            )
        return ManifestRecord(bytes(key), from_u64(raw[: _U64.size]), slots)

    def manifest_id(self, txn: Transaction, key: bytes) -> int | None:
        """The id of the manifest ``key``, without reading its slots."""
        with txn.cursor(db=self.manifests) as cursor:
            if not cursor.set_key(key):
                return None
            raw = cursor.value()
        if len(raw) < _U64.size:
            raise self.damaged(f"manifest {key.hex()} has a record of {len(raw)} bytes")
        return from_u64(raw[: _U64.size])

    def manifest_use_count(self, txn: Transaction, key: bytes) -> int:
        raw = txn.get(key, db=self.manifest_users)
        return 0 if raw is None else self._count(key, raw)

    def add_manifest(self, txn: Transaction, key: bytes, slots: Sequence[int]) -> int:
        """Record a manifest naming ``slots``, unused yet; return its id.  The caller
        has given it one reference per page to those slots."""
        manifest_id = from_u64(txn.get(b"next_manifest", b"", db=self.meta))
        txn.put(b"next_manifest", u64(manifest_id + 1), db=self.meta)
        txn.put(key, u64(manifest_id) + pack_slots(slots), db=self.manifests)
        return manifest_id

    def use_manifest(self, txn: Transaction, lease: LeaseRecord, key: bytes, pages: int) -> None:
        """Count one more use of the manifest ``key`` (of ``pages`` pages) by ``lease``."""
        users = self.manifest_use_count(txn, key)
        txn.put(key, u64(users + 1), db=self.manifest_users)
        lease_key = u64(lease.lease_id) + key
        raw = txn.get(lease_key, db=self.lease_manifests)
        uses = 0 if raw is None else self._count(lease_key, raw)
        txn.put(lease_key, u64(uses + 1), db=self.lease_manifests)
        references = lease.references + pages
        record = _LEASE_RECORD.pack(lease.pid, lease.start_time, lease.pid_namespace, references)
        txn.put(u64(lease.lease_id), record, db=self.leases)

    def manifest_records(self, txn: Transaction) -> Iterator[ManifestRecord]:
        for key, raw in txn.cursor(db=self.manifests):
            yield self._manifest_record(key, raw)

    def manifest_use_counts(self, txn: Transaction) -> dict[bytes, int]:
        return {
            bytes(key): self._count(key, raw) for key, raw in txn.cursor(db=self.manifest_users)
        }

    def lease_manifest_uses(self, txn: Transaction) -> Iterator[tuple[int, bytes, int]]:
        """(lease id, span key, uses) of every lease's use of a manifest."""
        for key, raw in txn.cursor(db=self.lease_manifests):
            if len(key) != 8 + SPAN_KEY_SIZE:
                raise self.damaged(f"a lease's use of a manifest has a key of {len(key)} bytes")
            yield from_u64(key[:8]), bytes(key[8:]), self._count(key, raw)

    def manifest_count(self, txn: Transaction) -> int:
        return int(txn.stat(self.manifests)["entries"])


class SlotBlocks:
    """The counts and hashes of slots as one write transaction reads and changes
    them, a block of :data:`SLOT_BLOCK` slots at a time; :meth:`flush` writes the
    changed blocks back, deleting those left with no slot in use (an empty pool
    records none).

    A slot is in use while its count is above zero; its hash is then the key under
    which the ``hashes`` table names it.  Counts are little-endian u64s, hashes 8
    bytes each, both in slot order within their block.
    """

    def __init__(self, index: PoolIndex, txn: Transaction) -> None:
        self._index = index
        self._txn = txn
        self._counts: dict[int, array.array[int]] = {}
        self._hashes: dict[int, bytearray] = {}
        self._changed: set[int] = set()

    def _block_counts(self, block: int) -> array.array[int]:
        counts = self._counts.get(block)
        if counts is None:
            raw = self._txn.get(u64(block), db=self._index.slot_counts)
            if raw is None:
                counts = array.array("Q", bytes(_COUNTS_BLOCK_SIZE))
            else:
                counts = self._index._counts_block(block, raw)
            self._counts[block] = counts
        return counts

    def _block_hashes(self, block: int) -> bytearray:
        hashes = self._hashes.get(block)
        if hashes is None:
            raw = self._txn.get(u64(block), db=self._index.slot_hashes)
            if raw is not None and len(raw) != _HASHES_BLOCK_SIZE:
                raise self._index.damaged(f"slot block {block} has hashes of {len(raw)} bytes")
            hashes = bytearray(_ZERO_HASHES if raw is None else raw)
            self._hashes[block] = hashes
        return hashes

    def count(self, slot: int) -> int:
        """The slot's reference count: 0 when it is not in use."""
        block, offset = divmod(slot, SLOT_BLOCK)
        return self._block_counts(block)[offset]

    def in_use_from(self, first: int, length: int) -> int:
        """How many of the slots ``first, first+1, ...`` (at most ``length``) are in
        use before the first that is not."""
        done = 0
        while done < length:
            block, offset = divmod(first + done, SLOT_BLOCK)
            take = min(length - done, SLOT_BLOCK - offset)
            zero = slot_arrays.first_zero(self._block_counts(block)[offset : offset + take])
            if zero >= 0:
                return done + zero
            done += take
        return done

    def add(self, slot: int, count: int = 1) -> None:
        """``count`` more references to a slot in use."""
        block, offset = divmod(slot, SLOT_BLOCK)
        counts = self._block_counts(block)
        if not counts[offset]:
            raise self._index.damaged(f"its hash table names slot {slot}, which is not in use")
        counts[offset] += count
        self._changed.add(block)

    def add_run(self, first: int, length: int) -> None:
        """One more reference to each of the slots ``first, ..., first+length-1``,
        all in use (:meth:`in_use_from` said so in this transaction)."""
        done = 0
        while done < length:
            block, offset = divmod(first + done, SLOT_BLOCK)
            take = min(length - done, SLOT_BLOCK - offset)
            counts = self._block_counts(block)
            raised, zero = slot_arrays.plus_one_in_use(counts[offset : offset + take])
            if zero >= 0:
                slot = first + done + zero
                raise self._index.damaged(f"slot {slot} was taken as in use but is not")
            counts[offset : offset + take] = raised
            self._changed.add(block)
            done += take

    def create(self, first: int, hash_keys: Sequence[bytes], counts: Sequence[int]) -> None:
        """Put slots ``first, first+1, ...`` (free until now) in use, holding pages with
        these hashes and starting with these counts (each above zero)."""
        if len(hash_keys) != len(counts) or 0 in counts:
            raise PoolError("new slots need one hash and a count above zero each")
        done = 0
        while done < len(counts):
            block, offset = divmod(first + done, SLOT_BLOCK)
            take = min(len(counts) - done, SLOT_BLOCK - offset)
            block_counts = self._block_counts(block)
            if any(block_counts[offset : offset + take]):
                raise self._index.damaged(f"slots from {first + done} were allocated in use")
            block_counts[offset : offset + take] = array.array("Q", counts[done : done + take])
            hashes = b"".join(hash_keys[done : done + take])
            if len(hashes) != take * _HASH_SIZE:
                raise PoolError(f"page hashes are {_HASH_SIZE} bytes each")
            at = offset * _HASH_SIZE
            self._block_hashes(block)[at : at + len(hashes)] = hashes
            self._changed.add(block)
            done += take
        entries = sorted(zip(hash_keys, map(u64, range(first, first + len(counts))), strict=True))
        self._txn.cursor(db=self._index.hashes).putmulti(entries, dupdata=True)

    def drop(self, counts: dict[int, int]) -> list[int]:
        """Lower the counts of slots in use; put those reaching zero out of use (and out
        of the hash table) and return them, in order."""
        order = sorted(counts)
        missing = [slot for slot in order if not self.count(slot)]
        if missing:
            raise self._index.damaged(f"a lease references slots {missing[:8]} that it lacks")
        freed = []
        hashes_table = self._index.hashes
        for slot in order:
            block, offset = divmod(slot, SLOT_BLOCK)
            block_counts = self._block_counts(block)
            references = block_counts[offset]
            remaining = references - counts[slot]
            if remaining < 0:
                raise self._index.damaged(
                    f"leases hold {counts[slot]} references to slot {slot}, which counts "
                    f"only {references}"
                )
            block_counts[offset] = remaining
            self._changed.add(block)
            if remaining == 0:
                hashes = self._block_hashes(block)
                at = offset * _HASH_SIZE
                self._txn.delete(bytes(hashes[at : at + _HASH_SIZE]), u64(slot), db=hashes_table)
                hashes[at : at + _HASH_SIZE] = bytes(_HASH_SIZE)
                freed.append(slot)
        return freed

    def flush(self) -> None:
        """Write the changed blocks back (deleting those with no slot in use)."""
        index, txn = self._index, self._txn
        for block in sorted(self._changed):
            key = u64(block)
            counts = self._counts[block]
            if any(counts):
                if sys.byteorder == "big":
                    counts = array.array("Q", counts)
                    counts.byteswap()
                txn.put(key, counts.tobytes(), db=index.slot_counts)
                hashes = self._hashes.get(block)
                if hashes is not None:  # loaded to be changed (or read alongside)
                    txn.put(key, bytes(hashes), db=index.slot_hashes)
            else:
                txn.delete(key, db=index.slot_counts)
                txn.delete(key, db=index.slot_hashes)
        self._changed.clear()
