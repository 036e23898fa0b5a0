"""Merging compares a region in place and predicts slots: whatever the prediction, the
region ends up mapping exactly its own bytes from the pool.

Slots are predicted from a few hashed pages (the pages after a page found at slot s
are looked for at s + 1, s + 2, ...), so these tests build regions whose predictions
go wrong in every way: pages in another order, a page differing from its predicted
slot in one byte, a predicted slot that is free, every hash colliding, and many
processes merging overlapping content at once.  Each checks the bytes by reading the
memory back, the sharing in /proc/PID/smaps, and the pool with its consistency check.
"""

from __future__ import annotations

import multiprocessing
import random
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path

import xxhash

from dksm.dedup.admission import ANCHOR_EVERY
from dksm.dedup.index import SLOT_BLOCK
from dksm.dedup.pool import PagePool
from dksm.dedup.references import STORE_CHUNK
from dksm.memory.host_mapping import PAGE_SIZE, map_anonymous, unmap, view
from test_pool_concurrency import merging_crowd
from test_pool_sharing import KIB, Region, pool_mappings_in, smaps, total

ZERO = bytes(PAGE_SIZE)


def page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def near_twin(seed: int) -> bytes:
    """``page(seed)`` with its last byte changed: found only by comparing all of it."""
    original = page(seed)
    return original[:-1] + bytes([original[-1] ^ 0xFF])


def populated(content: list[bytes]) -> Region:
    region = Region(len(content))
    view(region.address, region.length)[:] = b"".join(content)
    return region


def assert_maps_exactly(region: Region, content: list[bytes], pages_file: Path) -> None:
    """The region reads back as ``content`` and is the pool's pages file throughout."""
    assert region.bytes() == b"".join(content)  # reads (so maps) every page
    entries = pool_mappings_in(region, pages_file)
    assert total(entries, "Size") == region.length // KIB
    assert total(entries, "Rss") == region.length // KIB
    assert total(entries, "Anonymous") == 0


def test_a_merge_of_mixed_content_maps_exactly_the_regions_bytes(shm_root: Path) -> None:
    stored = [page(seed) for seed in range(3 * SLOT_BLOCK)]  # slots over several blocks
    mixed = (
        stored[100:400]  # in order: predicted
        + stored[700:600:-1]  # reversed: every prediction wrong, found by hash
        + [near_twin(seed) for seed in range(401, 411)]  # differ from predicted slots
        + [page(100_000 + n) for n in range(40)]  # new
        + [page(100_000)] * 3  # a new page three times more
        + [ZERO] * 70  # zero pages (new), more than an anchor's span
        + stored[1000:1200]  # in order again, after all that
    )
    with PagePool.open("mixed", shm_root) as pool, pool.lease() as lease:
        first = populated(stored)
        lease.merge(first.address, first.length)
        second = populated(mixed)
        result = lease.merge(second.address, second.length)
        assert (result.pages, result.pages_new) == (len(mixed), 10 + 40 + 1)
        pages_file = pool.directory / "pages"
        assert_maps_exactly(second, mixed, pages_file)
        assert_maps_exactly(first, stored, pages_file)
        # The pages both regions hold are single frames mapped twice: each region
        # (and the pool's comparison view) is charged a share, never the whole.
        both = pool_mappings_in(first, pages_file) + pool_mappings_in(second, pages_file)
        assert total(both, "Pss") < total(both, "Rss") - (300 + 100 + 200) * PAGE_SIZE // KIB
        stats = pool.stats()
        assert stats.hashtable_entries == len(stored) + 10 + 40 + 1
        assert stats.references == len(stored) + len(mixed)
        assert pool.verify() == []
        second.close()
        first.close()


def test_a_predicted_slot_that_is_free_is_never_referenced(shm_root: Path) -> None:
    """A freed slot reads as zeros (its page was punched): a zero page predicted to be
    there matches its bytes, but is not in use, so it is stored anew."""
    content = [page(1), ZERO, page(3)]
    with PagePool.open("holes", shm_root) as pool:
        with pool.lease() as keeps:
            regions = [populated([one]) for one in content]
            zero_lease = pool.lease()
            keeps.merge(regions[0].address, PAGE_SIZE)  # slot 0
            zero_lease.merge(regions[1].address, PAGE_SIZE)  # slot 1
            keeps.merge(regions[2].address, PAGE_SIZE)  # slot 2
            regions[1].close()
            zero_lease.release()  # slot 1 is free now, a hole reading zeros
            assert pool.stats().hashtable_entries == 2
            merged = populated(content)
            with pool.lease() as lease:
                result = lease.merge(merged.address, merged.length)
                assert (result.pages_merged, result.pages_new) == (2, 1)
                assert_maps_exactly(merged, content, pool.directory / "pages")
                assert pool.stats().hashtable_entries == 3
                assert pool.verify() == []
                merged.close()
            for region in (regions[0], regions[2]):
                region.close()
        assert pool.verify() == []


def test_every_hash_colliding_still_maps_each_regions_own_bytes(shm_root: Path) -> None:
    """With one hash for every page, each anchor names the same slot and every
    prediction and hash match is a candidate that only the bytes can settle."""
    stored = [page(seed) for seed in range(150)]
    shifted = stored[1:] + [page(999)] + [near_twin(seed) for seed in range(20)]
    with (
        PagePool.open("weak", shm_root, page_hash=lambda _page: 0) as pool,
        pool.lease() as lease,
    ):
        first = populated(stored)
        assert lease.merge(first.address, first.length).pages_new == len(stored)
        second = populated(shifted)
        result = lease.merge(second.address, second.length)
        assert (result.pages_merged, result.pages_new) == (149, 21)
        pages_file = pool.directory / "pages"
        assert_maps_exactly(first, stored, pages_file)
        assert_maps_exactly(second, shifted, pages_file)
        stats = pool.stats()
        assert stats.hashtable_entries == 150 + 21
        assert stats.merging_failed >= 21  # each new page met slots of its hash
        assert pool.verify() == []
        second.close()
        first.close()


def test_a_region_the_pool_holds_is_found_from_one_hashed_page(shm_root: Path) -> None:
    """Pages the pool holds in consecutive slots are predicted from one hashed page;
    where one differs, only the pages around it are hashed again."""
    hashed: list[int] = []

    def counted(data: memoryview) -> int:
        hashed.append(1)
        return int.from_bytes(xxhash.xxh3_64_digest(data), "big")

    stored = [page(seed) for seed in range(3 * SLOT_BLOCK)]
    changed = list(stored)
    changed[700] = near_twin(700)
    with PagePool.open("known", shm_root, page_hash=counted) as pool, pool.lease() as lease:
        first = populated(stored)
        assert lease.merge(first.address, first.length).pages_new == len(stored)
        pages_file = pool.directory / "pages"
        hashed.clear()
        same = populated(stored)
        result = lease.merge(same.address, same.length)
        assert (result.pages_merged, result.pages_new, result.mmaps) == (len(stored), 0, 1)
        assert len(hashed) == 1
        assert_maps_exactly(same, stored, pages_file)
        hashed.clear()
        other = populated(changed)
        result = lease.merge(other.address, other.length)
        assert (result.pages_merged, result.pages_new) == (len(stored) - 1, 1)
        # Two anchors (page 0, and the first anchor page after the part that differs)
        # and the pages of that part, one by one.
        assert len(hashed) == 2 + ANCHOR_EVERY
        assert_maps_exactly(other, changed, pages_file)
        assert_maps_exactly(first, stored, pages_file)
        assert pool.stats().hashtable_entries == len(stored) + 1
        assert pool.verify() == []
        for region in (other, same, first):
            region.close()


def test_new_pages_repeated_in_later_copies_are_stored_once(shm_root: Path) -> None:
    """A merge copies the pages it stores out a chunk at a time; a page met again in a
    later chunk is found among those the earlier chunks stored in the same
    transaction, compared byte for byte, and not stored twice."""
    fresh = [page(70_000 + n) for n in range(STORE_CHUNK + 40)]
    content = fresh + fresh[3 : STORE_CHUNK + 10] + [near_twin(70_005)]
    with PagePool.open("chunks", shm_root) as pool, pool.lease() as lease:
        region = populated(content)
        result = lease.merge(region.address, region.length)
        assert (result.pages, result.pages_new) == (len(content), len(fresh) + 1)
        assert_maps_exactly(region, content, pool.directory / "pages")
        assert pool.stats().hashtable_entries == len(fresh) + 1
        assert pool.verify() == []
        region.close()


def _content_of(worker: int) -> list[bytes]:
    """Shared pages in a worker's own order and offset, with pages of its own between."""
    shared = [page(seed) for seed in range(2 * SLOT_BLOCK)]
    shift = worker * (ANCHOR_EVERY // 2 + 3)
    own = [page(50_000 + worker * 100 + n) for n in range(30)]
    rotated = shared[shift:] + shared[:shift]
    return rotated[:500] + own + rotated[500:] + [ZERO] * 5 + shared[::-7]


def _merge_with_others(
    shm_root: Path, worker: int, start: Barrier, done: Event, report: multiprocessing.Queue[str]
) -> None:
    content = _content_of(worker)
    length = len(content) * PAGE_SIZE
    address = map_anonymous(length)
    view(address, length)[:] = b"".join(content)
    start.wait(timeout=60)
    with PagePool.open("crowd", shm_root) as pool, pool.lease() as lease:
        result = lease.merge(address, length)
        problem = ""
        if bytes(view(address, length)) != b"".join(content):
            problem = "the region reads back other bytes"
        mapped = [e for e in smaps() if e.path == str(pool.directory / "pages")]
        inside = [e for e in mapped if address <= e.start < address + length]
        if sum(e.kib["Size"] for e in inside) != length // KIB or any(
            e.kib["Anonymous"] for e in inside
        ):
            problem = "the region is not the pool's pages throughout"
        report.put(problem or f"ok {result.pages} {result.pages_new}")
        done.wait(timeout=120)
        unmap(address, length)


def test_processes_merging_overlapping_content_at_once_keep_the_pool_consistent(
    shm_root: Path,
) -> None:
    processes = 6
    reports, stats = merging_crowd(_merge_with_others, shm_root, processes, timeout=120)
    assert all(line.startswith("ok ") for line in reports), reports
    contents = [_content_of(worker) for worker in range(processes)]
    distinct = {one for content in contents for one in content}
    assert stats.hashtable_entries == len(distinct)
    assert stats.references == sum(len(content) for content in contents)
    assert sum(int(line.split()[2]) for line in reports) == len(distinct)
    with PagePool.open("crowd", shm_root) as pool:  # the workers are gone: swept
        after = pool.stats()
        assert (after.leases, after.references, after.file_blocks_bytes) == (0, 0, 0)
        assert pool.verify() == []
