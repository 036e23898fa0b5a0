"""The page pool shares pages: each distinct page is stored once, mapped copy-on-write
into every mapping of it, in one process or many, and never shared when bytes differ.

Everything is real: a tmpfs pool under /dev/shm, LMDB, mmap, and the kernel's own
account of the mappings in /proc/PID/smaps.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from dksm.dedup.pool import PagePool, PoolError
from dksm.memory.host_mapping import PAGE_SIZE, map_anonymous, unmap, view

KIB = 1024


@pytest.fixture
def pool(shm_root: Path) -> Iterator[PagePool]:
    with PagePool.open("test", shm_root) as opened:
        yield opened


def page(seed: int) -> bytes:
    """A page of pseudo-random bytes, the same for the same seed."""
    return random.Random(seed).randbytes(PAGE_SIZE)


def pages(*seeds: int) -> bytes:
    return b"".join(page(seed) for seed in seeds)


class Region:
    """Anonymous memory to load pool pages into, unmapped at the end of the test."""

    def __init__(self, page_count: int) -> None:
        self.length = page_count * PAGE_SIZE
        self.address = map_anonymous(self.length)

    def bytes(self) -> bytes:
        return bytes(view(self.address, self.length))

    def close(self) -> None:
        unmap(self.address, self.length)


@pytest.fixture
def region() -> Iterator[type[Region]]:
    made: list[Region] = []

    class TrackedRegion(Region):
        def __init__(self, page_count: int) -> None:
            super().__init__(page_count)
            made.append(self)

    yield TrackedRegion
    for each in made:
        each.close()


@dataclass
class SmapsEntry:
    start: int
    end: int
    path: str
    kib: dict[str, int] = field(default_factory=dict)


def smaps(pid: int | str = "self") -> list[SmapsEntry]:
    entries: list[SmapsEntry] = []
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")
    with open(f"/proc/{pid}/smaps") as lines:
        for line in lines:
            match = header.match(line)
            if match:
                start, end, path = match.groups()
                entries.append(SmapsEntry(int(start, 16), int(end, 16), path.strip()))
            elif line.rstrip().endswith(" kB"):
                name, value = line.split(":", 1)
                entries[-1].kib[name] = int(value.split()[0])
    return entries


def pool_mappings_in(region: Region, pages_file: Path, pid: int | str = "self") -> list[SmapsEntry]:
    """The mappings of the pool's pages file inside ``region``."""
    return [
        entry
        for entry in smaps(pid)
        if entry.path == str(pages_file)
        and region.address <= entry.start < region.address + region.length
    ]


def total(entries: list[SmapsEntry], name: str) -> int:
    return sum(entry.kib[name] for entry in entries)


def test_pool_file_holds_each_page_once(pool: PagePool, region: type[Region]) -> None:
    content = pages(1, 2, 3, 2, 1, 4)  # four distinct pages, two of them twice
    with pool.lease() as lease:
        first = lease.map_pages(region(6).address, content)
        second = lease.map_pages(region(6).address, content)
        stats = pool.stats()
    assert (first.pages, first.pages_new, first.pages_merged) == (6, 4, 2)
    assert (second.pages_new, second.pages_merged) == (0, 6)
    assert stats.hashtable_entries == 4
    assert stats.references == 12
    assert stats.pages_saved == 8
    assert stats.bytes_saved == 8 * PAGE_SIZE
    assert stats.file_blocks_bytes == 4 * PAGE_SIZE
    assert (stats.pages_scanned, stats.pages_merged, stats.merging_failed) == (12, 8, 0)


def test_loaded_content_reads_back_exactly(pool: PagePool, region: type[Region]) -> None:
    content = pages(*range(40), 7, 7, 0)
    target = region(43)
    with pool.lease() as lease:
        lease.map_pages(target.address, content)
        assert target.bytes() == content
        again = region(43)
        lease.map_pages(again.address, content)
        assert again.bytes() == content
        assert pool.verify() == []


def test_an_image_seen_first_time_maps_with_one_mmap(pool: PagePool, region: type[Region]) -> None:
    content = pages(*range(100))
    with pool.lease() as lease:
        assert lease.map_pages(region(100).address, content).mmaps == 1
        assert lease.map_pages(region(100).address, content).mmaps == 1
        # A page the pool lacks, in the middle, splits the run it interrupts.
        changed = pages(*range(50), 1000, *range(51, 100))
        result = lease.map_pages(region(100).address, changed)
    assert (result.pages_new, result.mmaps) == (1, 3)


def test_two_mappings_in_one_process_share_the_pool_frames(
    pool: PagePool, region: type[Region]
) -> None:
    content = pages(*range(16))
    first, second = region(16), region(16)
    with pool.lease() as lease:
        lease.map_pages(first.address, content)
        lease.map_pages(second.address, content)
        assert first.bytes() == second.bytes() == content  # touches every page
        pages_file = pool.directory / "pages"
        for mapped in (first, second):
            entries = pool_mappings_in(mapped, pages_file)
            assert total(entries, "Size") == 16 * PAGE_SIZE // KIB
            assert total(entries, "Rss") == 16 * PAGE_SIZE // KIB
            # Each frame is mapped at least twice (by both regions; the pool's view
            # for comparisons maps those it compared), so each region is charged at
            # most half of it ...
            assert total(entries, "Pss") <= 16 * PAGE_SIZE // KIB // 2
            assert total(entries, "Anonymous") == 0
        # ... and all the mappings of the pages file together the 16 frames once.
        every = [entry for entry in smaps() if entry.path == str(pages_file)]
        assert abs(total(every, "Pss") - 16 * PAGE_SIZE // KIB) <= len(every)  # kB rounding
        first.close()
        second.close()


def _map_and_wait(
    root: Path, content: bytes, ready: multiprocessing.Queue[tuple[int, int]], done: Event
) -> None:
    with PagePool.open("test", root) as pool, pool.lease() as lease:
        loaded = Region(len(content) // PAGE_SIZE)
        lease.map_pages(loaded.address, content)
        assert loaded.bytes() == content
        ready.put((os.getpid(), loaded.address))
        done.wait()
        loaded.close()


def test_processes_mapping_a_page_each_pay_a_share_of_it(shm_root: Path) -> None:
    processes = 4
    content = pages(*range(32))
    fork = multiprocessing.get_context("fork")
    ready: multiprocessing.Queue[tuple[int, int]] = fork.Queue()
    done = fork.Event()
    workers = [
        fork.Process(target=_map_and_wait, args=(shm_root, content, ready, done))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        loaded = [ready.get(timeout=30) for _ in workers]
        pages_file = shm_root / "test" / "pages"
        pss_everywhere = mappings = 0
        for pid, address in loaded:
            mapped = Region.__new__(Region)
            mapped.address, mapped.length = address, len(content)
            entries = pool_mappings_in(mapped, pages_file, pid)
            rss, pss = total(entries, "Rss"), total(entries, "Pss")
            assert rss == len(content) // KIB
            # Every frame is mapped by all the processes (and by the views of those
            # that compared it), so each pays at most a share of it ...
            assert pss * processes <= rss + processes * len(entries)  # kB rounding
            every = [entry for entry in smaps(pid) if entry.path == str(pages_file)]
            pss_everywhere += total(every, "Pss")
            mappings += len(every)
        # ... and all of them together the 32 frames exactly once.
        assert abs(pss_everywhere - len(content) // KIB) <= mappings
        assert os.stat(pages_file).st_blocks * 512 == len(content)
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=30)
    assert all(worker.exitcode == 0 for worker in workers)
    with PagePool.open("test", shm_root) as pool:
        assert pool.stats().hashtable_entries == 0


def test_writes_to_a_mapped_page_stay_private(pool: PagePool, region: type[Region]) -> None:
    content = pages(10, 11)
    writer, reader = region(2), region(2)
    with pool.lease() as lease:
        lease.map_pages(writer.address, content)
        lease.map_pages(reader.address, content)
        view(writer.address, 2 * PAGE_SIZE)[100:104] = b"\xde\xad\xbe\xef"
        assert writer.bytes()[100:104] == b"\xde\xad\xbe\xef"
        assert reader.bytes() == content
        with open(pool.directory / "pages", "rb") as pool_file:
            assert pool_file.read() == content
        written = pool_mappings_in(writer, pool.directory / "pages")
        assert total(written, "Private_Dirty") == PAGE_SIZE // KIB  # the private copy
        # Loading the same content again still finds the pool's unmodified pages.
        assert lease.map_pages(region(2).address, content).pages_merged == 2
        assert pool.verify() == []


def test_release_frees_slots_and_returns_their_blocks(pool: PagePool, region: type[Region]) -> None:
    shared, only_first = pages(1, 2, 3), pages(4, 5)
    first, second = pool.lease(), pool.lease()
    first_region, second_region = region(5), region(3)
    first.map_pages(first_region.address, shared + only_first)
    second.map_pages(second_region.address, shared)
    assert pool.stats().file_blocks_bytes == 5 * PAGE_SIZE
    first_region.close()
    first.release()
    stats = pool.stats()
    assert (stats.hashtable_entries, stats.references, stats.leases) == (3, 3, 1)
    assert stats.file_blocks_bytes == 3 * PAGE_SIZE
    assert second_region.bytes() == shared  # still backed by the pool, still intact
    second_region.close()
    second.release()
    stats = pool.stats()
    assert (stats.hashtable_entries, stats.references, stats.leases) == (0, 0, 0)
    assert stats.file_blocks_bytes == 0
    assert os.stat(pool.directory / "pages").st_blocks == 0
    index = pool._store.index
    with index.read() as txn:  # nothing left in the index either
        assert (index.end(txn), index.free_ranges(txn)) == (0, [])
        assert list(index.hash_entries(txn)) == []
        assert list(index.slot_records(txn)) == []
    assert pool.verify() == []


def test_freed_slots_are_reused_first_fit(pool: PagePool, region: type[Region]) -> None:
    keep, drop = pool.lease(), pool.lease()
    keep.map_pages(region(2).address, pages(1, 2))  # slots 0, 1
    drop.map_pages(region(3).address, pages(3, 4, 5))  # slots 2, 3, 4
    keep.map_pages(region(1).address, pages(6))  # slot 5
    drop.release()  # frees 2..4: a hole between live slots
    before = pool.stats().file_blocks_bytes
    too_big = keep.map_pages(region(4).address, pages(7, 8, 9, 10))  # does not fit: at the end
    fits = keep.map_pages(region(2).address, pages(11, 12))  # first fit: slots 2, 3
    assert (too_big.mmaps, fits.mmaps) == (1, 1)
    assert pool.stats().file_blocks_bytes == before + 6 * PAGE_SIZE
    with open(pool.directory / "pages", "rb") as pool_file:
        pool_file.seek(2 * PAGE_SIZE)
        assert pool_file.read(2 * PAGE_SIZE) == pages(11, 12)
    assert pool.verify() == []
    keep.release()
    assert pool.stats().file_blocks_bytes == 0
    assert pool.verify() == []


def test_colliding_hashes_never_share_differing_pages(shm_root: Path, region: type[Region]) -> None:
    content = pages(1, 2, 3, 1, 4, 2)
    with PagePool.open("weak", shm_root, page_hash=lambda _page: 0) as pool, pool.lease() as lease:
        first, second = region(6), region(6)
        result = lease.map_pages(first.address, content)
        assert (result.pages_new, result.pages_merged) == (4, 2)
        again = lease.map_pages(second.address, content)
        assert (again.pages_new, again.pages_merged) == (0, 6)
        assert first.bytes() == second.bytes() == content
        stats = pool.stats()
        assert stats.hashtable_entries == 4
        # Pages 2, 3 and 4 each met an earlier page with the same hash, other bytes.
        assert stats.merging_failed == 3
        assert pool.verify() == []


def test_merge_replaces_a_populated_region_with_pool_pages(
    pool: PagePool, region: type[Region]
) -> None:
    content = pages(*range(300))  # more than one merge batch
    populated, other = region(300), region(300)
    view(populated.address, populated.length)[:] = content
    view(other.address, other.length)[:] = content
    with pool.lease() as lease:
        first = lease.merge(populated.address, populated.length)
        second = lease.merge(other.address, other.length)
        assert (first.pages, first.pages_new, first.mapped) == (300, 300, True)
        assert (second.pages_merged, second.pages_new) == (300, 0)
        assert populated.bytes() == other.bytes() == content
        for merged in (populated, other):
            entries = pool_mappings_in(merged, pool.directory / "pages")
            assert total(entries, "Size") == 300 * PAGE_SIZE // KIB
            assert total(entries, "Anonymous") == 0
        populated.close()
        other.close()


def test_run_switch_off_maps_nothing(shm_root: Path, region: type[Region]) -> None:
    content = pages(1, 2)
    with PagePool.open("test", shm_root) as pool:
        pool.set_run(False)
    with PagePool.open("test", shm_root) as pool, pool.lease() as lease:
        assert pool.stats().run is False  # persisted in the index
        untouched = region(2)
        result = lease.map_pages(untouched.address, content)
        assert (result.mapped, result.pages, result.pages_merged, result.pages_new) == (
            False,
            2,
            0,
            0,
        )
        assert untouched.bytes() == bytes(2 * PAGE_SIZE)
        populated = region(2)
        view(populated.address, populated.length)[:] = content
        assert lease.merge(populated.address, populated.length).mapped is False
        assert pool_mappings_in(populated, pool.directory / "pages") == []
        stats = pool.stats()
        assert (stats.pages_scanned, stats.hashtable_entries, stats.references) == (0, 0, 0)
        pool.set_run(True)
        assert lease.map_pages(untouched.address, content).mapped is True
        assert untouched.bytes() == content


def test_existing_mappings_stay_when_the_run_switch_goes_off(
    pool: PagePool, region: type[Region]
) -> None:
    content = pages(5)
    with pool.lease() as lease:
        loaded = region(1)
        lease.map_pages(loaded.address, content)
        pool.set_run(False)
        assert loaded.bytes() == content
        assert pool.stats().references == 1


def test_domains_do_not_share(shm_root: Path, region: type[Region]) -> None:
    content = pages(1, 2)
    with (
        PagePool.open("tenant-a", shm_root) as a,
        PagePool.open("tenant-b", shm_root) as b,
        a.lease() as lease_a,
        b.lease() as lease_b,
    ):
        assert lease_a.map_pages(region(2).address, content).pages_new == 2
        assert lease_b.map_pages(region(2).address, content).pages_new == 2
        assert a.stats().hashtable_entries == b.stats().hashtable_entries == 2
        assert a.directory != b.directory


def test_several_leases_in_one_process_count_separately(
    pool: PagePool, region: type[Region]
) -> None:
    leases = [pool.lease() for _ in range(5)]
    for lease in leases:
        lease.map_pages(region(3).address, pages(1, 2, 3))
    assert {lease.references for lease in leases} == {3}
    assert pool.stats().leases == 5
    for lease in leases[:4]:
        lease.release()
    stats = pool.stats()
    assert (stats.leases, stats.references, stats.hashtable_entries) == (1, 3, 3)
    leases[4].release()
    assert pool.stats().hashtable_entries == 0


def test_map_pages_rejects_partial_pages_and_misalignment(
    pool: PagePool, region: type[Region]
) -> None:
    target = region(2)
    with pool.lease() as lease:
        with pytest.raises(PoolError, match="whole number of pages"):
            lease.map_pages(target.address, b"x" * 100)
        with pytest.raises(PoolError, match="not page aligned"):
            lease.map_pages(target.address + 8, page(1))
        assert lease.map_pages(target.address, b"").pages == 0
    with pytest.raises(PoolError, match="released"):
        lease.map_pages(target.address, page(1))


def test_merge_cpu_time_is_counted(pool: PagePool, region: type[Region]) -> None:
    assert pool.stats().merge_cpu_ns == 0
    with pool.lease() as lease:
        lease.map_pages(region(64).address, pages(*range(64)))
        spent = pool.stats().merge_cpu_ns
        assert spent > 0
        populated = region(64)
        view(populated.address, populated.length)[:] = pages(*range(64))
        lease.merge(populated.address, populated.length)
        assert pool.stats().merge_cpu_ns > spent


def test_stats_are_json_ready(pool: PagePool) -> None:
    as_json = pool.stats().to_json()
    assert as_json["run"] is True
    assert {
        "pages_scanned",
        "pages_merged",
        "merging_failed",
        "hashtable_entries",
        "leases",
        "references",
        "pages_saved",
        "bytes_saved",
        "file_blocks_bytes",
        "merge_cpu_ns",
    } <= as_json.keys()
