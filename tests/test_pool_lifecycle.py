"""A pool's life: where it lives, what it refuses to open, how leases of dead
processes are swept, and how it is purged.  Real files, LMDB and processes."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time
from pathlib import Path

import lmdb
import pytest

from dksm.dedup.owner import ProcessIdentity
from dksm.dedup.pool import (
    DEFAULT_POOL_ROOT,
    POOL_ROOT_ENV,
    PagePool,
    PoolError,
    pool_root,
    validate_domain,
)
from dksm.memory.host_mapping import PAGE_SIZE, map_anonymous, unmap


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def load(pool: PagePool, *seeds: int) -> tuple[int, int]:
    """Load pages under a new lease (never released here); return the region."""
    content = b"".join(page(seed) for seed in seeds)
    address = map_anonymous(len(content))
    pool.lease().map_pages(address, content)
    return address, len(content)


def rewrite_index(directory: Path, table: bytes | None, key: bytes, value: bytes) -> None:
    with lmdb.open(str(directory / "index"), max_dbs=16) as env:
        db = env.open_db(table) if table is not None else None
        with env.begin(write=True, db=db) as txn:
            txn.put(key, value)


@pytest.mark.parametrize(
    "name", ["", "/", "a/b", "..", ".", ".hidden", "-flag", "x" * 65, "a b", "a\0b", "é"]
)
def test_bad_domain_names_are_refused(name: str, shm_root: Path) -> None:
    with pytest.raises(PoolError, match="domain"):
        PagePool.open(name, shm_root)
    assert list(shm_root.iterdir()) == []


@pytest.mark.parametrize("name", ["default", "tenant-1", "a.b_c", "X" * 64])
def test_good_domain_names_are_accepted(name: str) -> None:
    assert validate_domain(name) == name


def test_pool_root_comes_from_argument_then_environment_then_default(
    shm_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(POOL_ROOT_ENV, raising=False)
    assert pool_root() == Path(DEFAULT_POOL_ROOT) == Path("/dev/shm/dksm")
    monkeypatch.setenv(POOL_ROOT_ENV, str(shm_root))
    with PagePool.open("from-env") as pool:
        assert pool.directory == shm_root / "from-env"
    assert pool_root(shm_root / "explicit") == shm_root / "explicit"


def test_a_new_pool_is_a_directory_of_pages_index_lock_and_ready(shm_root: Path) -> None:
    with PagePool.open("fresh", shm_root) as pool:
        assert pool.stats().hashtable_entries == 0
    names = {path.name for path in (shm_root / "fresh").iterdir()}
    assert names == {"pages", "index", "lock", "ready"}
    assert (shm_root / "fresh" / "index" / "data.mdb").is_file()


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        (b"format", b"99", "format 99"),
        (b"page_size", b"65536", "65536-byte pages"),
        (b"layout", b"meta slots", "layout"),
    ],
)
def test_a_pool_of_another_format_is_refused_and_kept(
    shm_root: Path, key: bytes, value: bytes, complaint: str
) -> None:
    pid = os.fork()
    if pid == 0:  # leaves a page and a dead lease behind
        load(PagePool.open("old", shm_root), 1)
        os._exit(0)
    os.waitpid(pid, 0)
    rewrite_index(shm_root / "old", b"meta", key, value)
    with pytest.raises(PoolError, match=complaint):
        PagePool.open("old", shm_root)
    assert os.stat(shm_root / "old" / "pages").st_size == PAGE_SIZE  # nothing was cleared


def test_an_index_missing_a_table_is_refused(shm_root: Path) -> None:
    PagePool.open("damaged", shm_root).close()
    with lmdb.open(str(shm_root / "damaged" / "index"), max_dbs=16) as env:
        free = env.open_db(b"free")
        with env.begin(write=True) as txn:
            txn.drop(free, delete=True)
    with pytest.raises(PoolError, match="lacks a table"):
        PagePool.open("damaged", shm_root)


def test_a_pool_of_the_format_before_manifests_is_refused_by_its_format(shm_root: Path) -> None:
    """Format 1 had no manifest tables: named as an older format, not as damage."""
    PagePool.open("older", shm_root).close()
    with lmdb.open(str(shm_root / "older" / "index"), max_dbs=16) as env:
        meta = env.open_db(b"meta")
        tables = [env.open_db(name) for name in (b"manifests", b"lease_manifests")]
        with env.begin(write=True) as txn:
            for table in tables:
                txn.drop(table, delete=True)
            txn.put(b"format", b"1", db=meta)
    with pytest.raises(PoolError, match="has format 1, and this dksm reads only format 3"):
        PagePool.open("older", shm_root)


def test_a_pool_of_the_format_before_slot_blocks_is_refused_with_the_way_out(
    shm_root: Path,
) -> None:
    """Format 2 kept one record per slot: refused as an older format, in one line that
    says how to remove it."""
    PagePool.open("older", shm_root).close()
    with lmdb.open(str(shm_root / "older" / "index"), max_dbs=16) as env:
        meta = env.open_db(b"meta")
        tables = [env.open_db(name) for name in (b"slot_counts", b"slot_hashes")]
        slots = env.open_db(b"slots")
        with env.begin(write=True) as txn:
            for table in tables:
                txn.drop(table, delete=True)
            txn.put(struct.pack(">Q", 0), b"h" * 8 + struct.pack(">Q", 1), db=slots)
            txn.put(b"format", b"2", db=meta)
    with pytest.raises(PoolError) as refused:
        PagePool.open("older", shm_root)
    message = str(refused.value)
    assert "has format 2, and this dksm reads only format 3" in message
    assert "dksm pool purge --domain older" in message and "--force" in message
    assert "\n" not in message


def test_an_index_that_is_not_lmdb_is_refused(shm_root: Path) -> None:
    PagePool.open("garbage", shm_root).close()
    (shm_root / "garbage" / "index" / "data.mdb").write_bytes(b"not a database" * 1000)
    with pytest.raises(PoolError, match="cannot be opened"):
        PagePool.open("garbage", shm_root)


def test_a_half_created_pool_is_cleared_and_created_again(shm_root: Path) -> None:
    directory = shm_root / "half"
    directory.mkdir()
    (directory / "pages").write_bytes(b"left over" * 1000)
    (directory / "index").mkdir()  # a creation that died before writing `ready`
    with PagePool.open("half", shm_root) as pool:
        assert pool.stats().file_blocks_bytes == 0
        assert pool.verify() == []


def test_purge_refuses_live_leases_then_removes_the_pool(shm_root: Path) -> None:
    pool = PagePool.open("gone", shm_root)
    lease = pool.lease()
    address = map_anonymous(PAGE_SIZE)
    lease.map_pages(address, page(1))
    with pytest.raises(PoolError, match="live lease"):
        pool.purge()
    unmap(address, PAGE_SIZE)
    lease.release()
    pool.purge()
    assert not (shm_root / "gone").exists()
    with pytest.raises(PoolError, match="closed"):
        pool.stats()


def test_purge_succeeds_once_the_lease_holders_are_gone(shm_root: Path) -> None:
    context = multiprocessing.get_context("fork")
    holder = context.Process(target=_hold_a_lease, args=(shm_root,))
    holder.start()
    try:
        with PagePool.open("held", shm_root) as pool:
            _wait_for_leases(pool, 1)
            with pytest.raises(PoolError, match="live lease"):
                pool.purge()
    finally:
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    with PagePool.open("held", shm_root) as pool:
        assert pool.stats().leases == 0  # swept on open
        pool.purge()
    assert not (shm_root / "held").exists()
    with PagePool.open("held", shm_root) as pool:  # and it can be created again
        assert pool.stats().hashtable_entries == 0


def _hold_a_lease(shm_root: Path) -> None:
    pool = PagePool.open("held", shm_root)
    load(pool, 1, 2, 3)
    signal.pause()


def _wait_for_leases(pool: PagePool, count: int) -> None:
    deadline = time.monotonic() + 30
    while pool.stats().leases < count:
        assert time.monotonic() < deadline, f"no {count} leases appeared"
        time.sleep(0.01)


def test_purge_refuses_while_another_process_has_the_pool_open(shm_root: Path) -> None:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        PagePool.open("shared", shm_root)
        os.write(writer, b"x")
        signal.pause()
    os.close(writer)
    try:
        assert os.read(reader, 1) == b"x"
        with PagePool.open("shared", shm_root) as pool:
            with pytest.raises(PoolError, match="open in another process"):
                pool.purge()
            assert pool.stats().run is True  # the handle still works after the refusal
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(reader)


def test_purge_refuses_while_open_twice_in_this_process(shm_root: Path) -> None:
    with (
        PagePool.open("twice", shm_root) as first,
        PagePool.open("twice", shm_root),
        pytest.raises(PoolError, match="more than once"),
    ):
        first.purge()


def test_leases_of_dead_processes_are_swept_on_open(shm_root: Path) -> None:
    pid = os.fork()
    if pid == 0:
        pool = PagePool.open("sweep", shm_root)
        load(pool, 1, 2, 3)
        os._exit(0)  # no release, no cleanup: as if it crashed
    os.waitpid(pid, 0)
    with PagePool.open("sweep", shm_root) as pool:
        stats = pool.stats()
        assert (stats.leases, stats.references, stats.hashtable_entries) == (0, 0, 0)
        assert stats.file_blocks_bytes == 0
        assert pool.verify() == []


def _rewrite_only_lease(pool: PagePool, **changes: int) -> None:
    """Change the owner fields of the pool's only lease record, in place."""
    (lease,) = pool.leases()
    index = pool._store.index
    key = struct.pack(">Q", lease.lease_id)
    with index.write() as txn:
        raw = txn.get(key, db=index.leases)
        assert raw is not None
        names = ("pid", "start_time", "ns", "references")
        fields = dict(zip(names, struct.unpack(">QQQQ", raw), strict=True))
        fields.update(changes)
        txn.put(key, struct.pack(">QQQQ", *fields.values()), db=index.leases)


def test_a_reused_pid_does_not_own_a_dead_process_lease(shm_root: Path) -> None:
    with PagePool.open("reuse", shm_root) as pool:
        address, length = load(pool, 1)
        unmap(address, length)
        assert pool.leases()[0].alive
        me = ProcessIdentity.current()
        _rewrite_only_lease(pool, start_time=me.start_time + 1)  # our pid, not our process
        assert not pool.leases()[0].alive
        assert pool.sweep() == 1
        assert pool.stats().leases == 0
        assert pool.stats().file_blocks_bytes == 0


def test_leases_from_another_pid_namespace_are_left_alone(shm_root: Path) -> None:
    with PagePool.open("ns", shm_root) as pool:
        address, length = load(pool, 1)
        unmap(address, length)
        _rewrite_only_lease(pool, pid=2**31, ns=1)  # a dead pid, but not ours to judge
        assert pool.sweep() == 0
        assert pool.stats().leases == 1


def test_blocks_a_killed_writer_left_in_free_space_are_punched(shm_root: Path) -> None:
    with PagePool.open("leftover", shm_root) as pool:
        address, length = load(pool, 1, 2)
        # What a writer killed between writing pages and committing leaves behind:
        # pages in the file beyond the slots the index knows.
        with open(shm_root / "leftover" / "pages", "r+b") as pages_file:
            pages_file.seek(5 * PAGE_SIZE)
            pages_file.write(page(9) * 3)
        assert pool.stats().file_blocks_bytes == 5 * PAGE_SIZE
        assert pool.sweep() == 0
        assert pool.stats().file_blocks_bytes == 2 * PAGE_SIZE
        assert pool.verify() == []
        unmap(address, length)


def test_a_lease_cannot_be_used_by_a_forked_child(shm_root: Path) -> None:
    with PagePool.open("fork", shm_root) as pool, pool.lease() as lease:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                lease.map_pages(map_anonymous(PAGE_SIZE), page(1))
            except PoolError as error:
                os.write(writer, b"refused" if "belongs to process" in str(error) else b"other")
            else:
                os.write(writer, b"allowed")
            os._exit(0)
        os.close(writer)
        assert os.read(reader, 16) == b"refused"
        os.waitpid(pid, 0)
        os.close(reader)
        assert pool.stats().references == 0
