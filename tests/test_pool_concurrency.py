"""Many processes on one pool: killed mid-merge, or merging all at the same moment,
the counts stay exact and nothing leaks.  Real processes, signals and files."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

from dksm.dedup.pool import PagePool, PoolStats
from dksm.memory.host_mapping import PAGE_SIZE, map_anonymous, unmap, view

FORK = multiprocessing.get_context("fork")


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


SHARED = [page(seed) for seed in range(64)]


def _merge_forever(shm_root: Path, seed: int) -> None:
    """Load, merge and release mixes of shared and new pages until killed."""
    chooser = random.Random(seed)
    pool = PagePool.open("crash", shm_root)
    serial = 0
    while True:
        with pool.lease() as lease:
            for _ in range(chooser.randint(1, 4)):
                serial += 1
                count = chooser.randint(1, 48)
                content = b"".join(
                    chooser.choice(SHARED)
                    if chooser.random() < 0.7
                    else page(seed * 10**6 + serial * 100 + i)
                    for i in range(count)
                )
                address = map_anonymous(len(content))
                if chooser.random() < 0.5:
                    lease.map_pages(address, content)
                else:
                    view(address, len(content))[:] = content
                    lease.merge(address, len(content))
            # Unmapping is left to exit or never happens: the lease's pages stay mapped.


def test_killing_merging_processes_leaks_nothing(shm_root: Path) -> None:
    kills = 60
    chooser = random.Random(1234)
    with PagePool.open("crash", shm_root) as pool, pool.lease() as survivor:
        kept = b"".join(SHARED[:8]) + page(999)
        kept_at = map_anonymous(len(kept))
        survivor.map_pages(kept_at, kept)
        for round_number in range(kills):
            child = FORK.Process(target=_merge_forever, args=(shm_root, round_number + 1))
            child.start()
            time.sleep(chooser.uniform(0.0, 0.03))
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            assert child.exitcode == -signal.SIGKILL
        # Whoever opens the pool next sweeps; here that is this same process.
        with PagePool.open("crash", shm_root) as reopened:
            assert reopened.verify() == []
            stats = reopened.stats()
            assert stats.leases == 1
            assert stats.references == survivor.references == 9
            assert stats.hashtable_entries == 9
            assert stats.file_blocks_bytes == 9 * PAGE_SIZE
            assert bytes(view(kept_at, len(kept))) == kept  # the live mapping is intact
        unmap(kept_at, len(kept))
    with PagePool.open("crash", shm_root) as pool:
        stats = pool.stats()
        assert (stats.leases, stats.references, stats.hashtable_entries) == (0, 0, 0)
        assert stats.file_blocks_bytes == 0
        assert os.stat(shm_root / "crash" / "pages").st_blocks == 0
        assert pool.verify() == []


def _merge_at_once(
    shm_root: Path,
    worker: int,
    start: Barrier,
    done: Event,
    results: multiprocessing.Queue[tuple[int, int, int]],
) -> None:
    content = b"".join(SHARED[:48]) + page(10_000 + worker) * 2 + page(20_000 + worker)
    address = map_anonymous(len(content))
    view(address, len(content))[:] = content
    start.wait()  # open and merge at the same moment: the pool does not exist yet
    with PagePool.open("crowd", shm_root) as pool, pool.lease() as lease:
        result = lease.merge(address, len(content))
        assert bytes(view(address, len(content))) == content
        results.put((result.pages, result.pages_merged, result.pages_new))
        done.wait()
        unmap(address, len(content))


def merging_crowd(
    worker_main: Callable[[Path, int, Barrier, Event, multiprocessing.Queue[Any]], None],
    shm_root: Path,
    processes: int,
    *,
    timeout: float,
) -> tuple[list[Any], PoolStats]:
    """Run ``processes`` forked ``worker_main(shm_root, worker, start, done, reports)``
    that meet at one barrier.  Returns one report from each and the "crowd" pool's
    stats, read (and the pool verified) while every worker still holds its lease;
    then the workers are let go, joined, and must all have exited 0."""
    start, done = FORK.Barrier(processes), FORK.Event()
    reports: multiprocessing.Queue[Any] = FORK.Queue()
    workers = [
        FORK.Process(target=worker_main, args=(shm_root, worker, start, done, reports))
        for worker in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        received = [reports.get(timeout=timeout) for _ in workers]
        with PagePool.open("crowd", shm_root) as pool:
            stats = pool.stats()
            assert pool.verify() == []
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=60)
    assert all(worker.exitcode == 0 for worker in workers)
    return received, stats


def test_32_processes_merging_at_the_same_moment_count_exactly(shm_root: Path) -> None:
    processes = 32
    merged, stats = merging_crowd(_merge_at_once, shm_root, processes, timeout=60)
    # 48 shared pages, and per process one page twice and one page once.
    assert sum(new for _, _, new in merged) == 48 + 2 * processes
    assert sum(pages for pages, _, _ in merged) == 51 * processes
    assert stats.hashtable_entries == 48 + 2 * processes
    assert stats.references == 51 * processes
    assert stats.leases == processes
    assert stats.pages_merged == 51 * processes - stats.hashtable_entries
    assert stats.file_blocks_bytes == stats.hashtable_entries * PAGE_SIZE
    with PagePool.open("crowd", shm_root) as pool:
        after = pool.stats()
        assert (after.leases, after.references, after.file_blocks_bytes) == (0, 0, 0)


def _open_then_wait_for_all(shm_root: Path, start: Barrier, opened: Barrier) -> None:
    start.wait(timeout=30)  # all race to create the pool
    with PagePool.open("rush", shm_root) as pool:
        # Holding the pool open while waiting for the others: an opener that waited
        # for the creation lock here would wait forever.
        opened.wait(timeout=30)
        assert pool.stats().run is True


def test_processes_creating_a_pool_at_once_all_open_it(shm_root: Path) -> None:
    processes = 48
    start, opened = FORK.Barrier(processes), FORK.Barrier(processes)
    workers = [
        FORK.Process(target=_open_then_wait_for_all, args=(shm_root, start, opened))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * processes
    assert (shm_root / "rush" / "ready").exists()
