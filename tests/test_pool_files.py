"""The pool's two files alone, on a small tmpfs of their own: the pages file (slots,
holes, a full filesystem) and the index (slots, references, free ranges, leases,
transactions), without PagePool above them.

As root each test mounts a tmpfs of its own and unmounts it; elsewhere it uses a
directory on /dev/shm (and skips what needs a filesystem that small)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dksm.dedup.index import SLOT_BLOCK, LeaseRecord, PoolIndex
from dksm.dedup.pages_file import PagesFile, PagesFileError
from dksm.memory.host_mapping import PAGE_SIZE

from conftest import IS_ROOT, SHM

TMPFS_SIZE = 256 * 1024  # 64 pages: small enough to fill


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    if IS_ROOT and shutil.which("mount"):
        directory = Path(tempfile.mkdtemp(prefix="dksm-tmpfs-"))
        options = f"size={TMPFS_SIZE},mode=0700"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True)
        try:
            yield directory
        finally:
            subprocess.run(["umount", str(directory)], check=True)
            directory.rmdir()
    else:
        directory = Path(tempfile.mkdtemp(prefix="dksm-test-", dir=SHM))
        try:
            yield directory
        finally:
            shutil.rmtree(directory)


@pytest.fixture
def pages(tmpfs: Path) -> Iterator[PagesFile]:
    fd = os.open(tmpfs / "pages", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    pages_file = PagesFile(fd)
    try:
        yield pages_file
    finally:
        pages_file.close()


@pytest.fixture
def index(tmpfs: Path) -> Iterator[PoolIndex]:
    path = tmpfs / "index"
    path.mkdir(mode=0o700)
    opened = PoolIndex(os.open(path, os.O_RDONLY | os.O_DIRECTORY), path, create=True, hint="h")
    try:
        with opened.write() as txn:
            opened.initialise(txn, PAGE_SIZE)
        yield opened
    finally:
        opened.close()


def _page(fill: int) -> memoryview:
    return memoryview(bytes([fill]) * PAGE_SIZE)


def test_pages_are_stored_at_their_slot_and_read_back(pages: PagesFile) -> None:
    pages.write(0, [_page(1), _page(2), _page(3)])
    assert pages.read(1, 1) == bytes(_page(2))
    assert pages.read(0, 3) == b"".join(bytes(_page(n)) for n in (1, 2, 3))
    assert pages.size() == 3 * PAGE_SIZE
    assert pages.allocated_bytes() == 3 * PAGE_SIZE


def test_a_punched_slot_reads_zeros_and_holds_no_storage(pages: PagesFile) -> None:
    pages.write(0, [_page(1), _page(2), _page(3)])
    pages.punch(1, 1)
    assert pages.read(1, 1) == bytes(PAGE_SIZE)
    assert pages.read(2, 1) == bytes(_page(3))
    assert pages.allocated_bytes() == 2 * PAGE_SIZE
    assert pages.size() == 3 * PAGE_SIZE  # the slots stay; their storage goes


def test_reading_past_the_end_is_an_error_naming_the_slot(pages: PagesFile) -> None:
    pages.write(0, [_page(1)])
    with pytest.raises(PagesFileError, match="slot 1 lies beyond the end"):
        pages.read(1, 1)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a tmpfs small enough to fill")
def test_a_full_tmpfs_is_an_error_not_a_crash(pages: PagesFile) -> None:
    too_many = TMPFS_SIZE // PAGE_SIZE + 1
    with pytest.raises(PagesFileError, match="is its tmpfs full"):
        pages.write(0, [_page(7)] * too_many)


def test_new_slots_are_found_by_hash_and_counted(index: PoolIndex) -> None:
    with index.write() as txn:
        first, at_end = index.allocate(txn, 3)
        assert (first, at_end) == (0, True)
        index.add_slots(txn, 0, [b"hash-a..", b"hash-b..", b"hash-a.."], {0: 1, 1: 2, 2: 1})
    with index.read() as txn:
        assert index.end(txn) == 3
        assert index.entries(txn) == (3, 0)
        found = index.first_slots(txn, [b"hash-a..", b"hash-b..", b"missing."])
        assert {k: int.from_bytes(v, "big") for k, v in found.items()} == {
            b"hash-a..": 0,
            b"hash-b..": 1,
        }
        assert index.slots_with_hash(txn, b"hash-a..") == [0, 2]  # a collision: both
        assert [(r.slot, r.references) for r in index.slot_records(txn)] == [(0, 1), (1, 2), (2, 1)]


def test_slots_reaching_zero_are_freed_and_their_space_reused(index: PoolIndex) -> None:
    with index.write() as txn:
        index.allocate(txn, 4)
        keys = [b"a" * 8, b"b" * 8, b"c" * 8, b"d" * 8]
        index.add_slots(txn, 0, keys, {0: 1, 1: 1, 2: 2, 3: 1})
    with index.write() as txn:
        assert index.drop_references(txn, {1: 1, 2: 1}) == [1]  # slot 2 keeps one
        index.release_runs(txn, [(1, 1)])
        assert index.free_ranges(txn) == [(1, 1)]
        assert index.allocate(txn, 1) == (1, False)  # first fit, not the end
        assert index.free_ranges(txn) == []


def test_free_ranges_coalesce_and_the_end_moves_down_over_them(index: PoolIndex) -> None:
    with index.write() as txn:
        index.allocate(txn, 5)
        index.add_slots(txn, 0, [bytes([n]) * 8 for n in range(5)], dict.fromkeys(range(5), 1))
        index.drop_references(txn, {1: 1, 3: 1})
        index.release_runs(txn, [(1, 1), (3, 1)])
        assert index.free_ranges(txn) == [(1, 1), (3, 1)]
        index.drop_references(txn, {2: 1})
        index.release_runs(txn, [(2, 1)])
        assert index.free_ranges(txn) == [(1, 3)]
        index.drop_references(txn, {4: 1})
        index.release_runs(txn, [(4, 1)])
        assert index.free_ranges(txn) == []  # 1..4 touched the end: the end is 1 now
        assert index.end(txn) == 1


def test_slot_counts_span_blocks_and_an_empty_block_leaves_no_record(index: PoolIndex) -> None:
    first = SLOT_BLOCK - 3  # six slots over two blocks
    keys = [bytes([n]) * 8 for n in range(6)]
    with index.write() as txn:
        index.allocate(txn, first + 6)
        index.add_slots(txn, first, keys, dict.fromkeys(range(first, first + 6), 1))
        blocks = index.slot_blocks(txn)
        assert blocks.in_use_from(first - 1, 8) == 0
        assert blocks.in_use_from(first, 8) == 6
        blocks.add_run(first + 1, 4)
        blocks.flush()
    with index.read() as txn:
        counted = [(r.slot, r.page_hash, r.references) for r in index.slot_records(txn)]
        assert counted == [(first + n, keys[n], 2 if 1 <= n <= 4 else 1) for n in range(6)]
        assert list(index.slot_block_problems(txn)) == []
    with index.write() as txn:
        freed = index.drop_references(txn, {first + n: 2 if 1 <= n <= 4 else 1 for n in range(6)})
        assert freed == list(range(first, first + 6))
    with index.read() as txn:
        assert list(index.slot_records(txn)) == []
        assert list(index.hash_entries(txn)) == []
        assert index.entries(txn) == (0, 0)
        assert list(index.slot_block_problems(txn)) == []


def test_a_lease_holds_its_chunks_until_removed(index: PoolIndex) -> None:
    with index.write() as txn:
        index.allocate(txn, 2)
        index.add_slots(txn, 0, [b"x" * 8, b"y" * 8], {0: 2, 1: 1})
        lease_id = index.new_lease(txn, pid=123, start_time=456, pid_namespace=789)
        lease = index.lease(txn, lease_id)
        assert lease == LeaseRecord(lease_id, 123, 456, 789, 0)
        index.add_chunk(txn, lease, [0, 1])
        lease = index.lease(txn, lease_id)
        assert lease is not None
        index.add_chunk(txn, lease, [0])
    with index.read() as txn:
        record = index.lease(txn, lease_id)
        assert record is not None and record.references == 3
        assert [list(chunk) for _, chunk in index.lease_chunks(txn, lease_id)] == [[0, 1], [0]]
    with index.write() as txn:
        assert index.remove_lease(txn, lease_id) == (Counter({0: 2, 1: 1}), 3)
        assert index.lease(txn, lease_id) is None
        assert index.lease_ids_with_chunks(txn) == set()


def test_a_failed_write_transaction_leaves_nothing(index: PoolIndex) -> None:
    with pytest.raises(RuntimeError), index.write() as txn:
        index.allocate(txn, 2)
        index.add_to_counters(txn, {"pages_scanned": 2})
        raise RuntimeError("the loader failed half-way")
    with index.read() as txn:
        assert index.end(txn) == 0
        assert index.read_counters(txn)["pages_scanned"] == 0


def test_what_was_committed_is_there_when_opened_again(tmpfs: Path) -> None:
    path = tmpfs / "index"
    path.mkdir(mode=0o700)
    first = PoolIndex(os.open(path, os.O_RDONLY | os.O_DIRECTORY), path, create=True, hint="h")
    with first.write() as txn:
        first.initialise(txn, PAGE_SIZE)
        first.set_run(txn, False)
        first.add_to_counters(txn, {"pages_merged": 5})
    first.close()
    again = PoolIndex(os.open(path, os.O_RDONLY | os.O_DIRECTORY), path, create=False, hint="h")
    try:
        with again.read() as txn:
            assert not again.run(txn)
            assert again.read_counters(txn)["pages_merged"] == 5
            assert again.meta_text(txn, "format") == "3"
    finally:
        again.close()
