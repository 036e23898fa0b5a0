"""Known images in one step: a load whose whole content the pool already holds is
referenced through its manifest (one use counted, nothing per page), and a manifest
never maps bytes other than the load's: not under a forced hash collision, not after
the image file changes, not after its pages were damaged.

Real pools on tmpfs, real mappings read back, real guests booted.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

from dksm.dedup.pool import PagePool
from dksm.guests import guest_path
from dksm.loader.elf import load_elf
from dksm.loader.segment import shareable_span
from dksm.memory.host_mapping import PAGE_SIZE, map_anonymous, unmap, view

from conftest import dksm, requires_kvm, requires_root


def content(seed: int, count: int) -> bytes:
    return random.Random(seed).randbytes(count * PAGE_SIZE)


class Loaded:
    """Content mapped from the pool into fresh anonymous memory."""

    def __init__(self, pool: PagePool, data: bytes) -> None:
        self.lease = pool.lease()
        self.length = len(data)
        self.address = map_anonymous(self.length)
        self.result = self.lease.map_pages(self.address, data)

    def shows(self) -> bytes:
        return bytes(view(self.address, self.length))

    def release(self) -> None:
        unmap(self.address, self.length)
        self.lease.release()


def test_a_known_image_is_referenced_through_its_manifest(shm_root: Path) -> None:
    image = content(1, 64)
    with PagePool.open("test", shm_root) as pool:
        first = Loaded(pool, image)
        assert first.result.pages_new == 64
        assert (pool.stats().manifests, pool.stats().manifest_pages) == (1, 0)
        second = Loaded(pool, image)
        assert second.result.pages_merged == 64 and second.result.mmaps == 1
        assert second.shows() == image
        stats = pool.stats()
        assert (stats.manifests, stats.manifest_pages) == (1, 64)
        assert (stats.hashtable_entries, stats.references, stats.pages_saved) == (64, 128, 64)
        assert pool.verify() == []
        first.release()  # the manifest lives on while the second load uses it
        assert pool.stats().hashtable_entries == 64 and second.shows() == image
        assert pool.verify() == []
        second.release()
        stats = pool.stats()
        assert (stats.manifests, stats.hashtable_entries, stats.references) == (0, 0, 0)
        assert stats.file_blocks_bytes == 0
        assert pool.verify() == []


def test_a_forced_span_collision_maps_the_loads_own_bytes(shm_root: Path) -> None:
    """Every load of 8 pages has the same key: only the comparison tells them apart."""
    a, b = content(2, 8), content(3, 8)
    with PagePool.open("test", shm_root, span_hash=lambda data: 7) as pool:
        first = Loaded(pool, a)
        other = Loaded(pool, b)
        assert other.shows() == b and other.result.pages_new == 8
        assert pool.stats().manifest_pages == 0  # the manifest of a was not used for b
        again = Loaded(pool, a)
        assert again.shows() == a and pool.stats().manifest_pages == 8
        assert pool.stats().hashtable_entries == 16
        assert pool.verify() == []
        for loaded in (first, other, again):
            loaded.release()
        assert pool.stats().hashtable_entries == 0 and pool.verify() == []


def test_a_manifest_whose_pages_were_changed_is_not_used(shm_root: Path) -> None:
    """Bytes written into the pages file behind the pool's back (only its owner can):
    the next load compares, refuses the manifest and stores its own pages."""
    image = content(4, 4)
    with PagePool.open("test", shm_root) as pool:
        first = Loaded(pool, image)
        with open(pool.directory / "pages", "r+b") as pages:
            pages.seek(2 * PAGE_SIZE + 100)
            pages.write(b"tampered")
        problems = pool.verify()
        assert any("names slots that do not hold its content" in p for p in problems)
        second = Loaded(pool, image)
        assert second.shows() == image
        assert pool.stats().manifest_pages == 0 and second.result.pages_new == 1
        second.release()
        first.release()


def test_an_image_changed_on_disk_is_loaded_anew(shm_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(content(5, 16))
    with PagePool.open("test", shm_root) as pool:
        first = Loaded(pool, path.read_bytes())
        with open(path, "r+b") as image:  # one byte of page 9 changes
            image.seek(9 * PAGE_SIZE + 5)
            image.write(b"\xa5")
        changed = path.read_bytes()
        second = Loaded(pool, changed)
        assert second.shows() == changed
        assert second.result.pages_new == 1 and pool.stats().manifests == 2
        third = Loaded(pool, changed)  # and the changed image is known from now on
        assert third.shows() == changed and pool.stats().manifest_pages == 16
        assert pool.verify() == []
        for loaded in (first, second, third):
            loaded.release()


def patched_spans(image: Path, mem_size: int) -> list[bytes]:
    found = []
    for segment in load_elf(str(image), mem_size).segments:
        start, end = shareable_span(segment)
        found.append(bytes(segment.data[start - segment.guest_addr : end - segment.guest_addr]))
    return found


@requires_kvm
@requires_root
def test_a_guest_rebuilt_with_other_read_only_bytes_prints_them(
    shm_root: Path, tmp_path: Path
) -> None:
    """A real guest booted from the pool while the image's pages are held (as by a
    running VM of it), then patched in its read-only data (the text it prints) and
    booted again: the first boot takes the manifest, the patched one prints its own
    text although the old manifest is still in the pool."""
    image = tmp_path / "hello.elf"
    shutil.copyfile(guest_path("hello"), image)
    mem_size = 16 << 20

    def boot() -> subprocess.CompletedProcess[str]:
        return dksm("run", "--kernel", str(image), "--mem-mib", "16", "--pool-root",
                    str(shm_root))  # fmt: skip

    with PagePool.open("default", shm_root) as pool:
        held, spans = [], []
        for segment in load_elf(str(image), mem_size).segments:
            start, end = shareable_span(segment)
            if end > start:
                span = segment.data[start - segment.guest_addr : end - segment.guest_addr]
                held.append(Loaded(pool, span))
                spans.append(bytes(span))
        assert held and pool.stats().manifests == len(held)
        result = boot()
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == "hello: bye"
        shared = sum(loaded.length for loaded in held) // PAGE_SIZE
        assert pool.stats().manifest_pages == shared  # the boot took every manifest
        data = image.read_bytes()
        at = data.index(b"hello: bye\n")
        image.write_bytes(data[:at] + b"hello: BYE\n" + data[at + 11 :])
        result = boot()
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == "hello: BYE"
        # Only the spans the patch left alone were taken through their manifests.
        unchanged = sum(len(span) for span in spans if span in patched_spans(image, mem_size))
        assert 0 <= unchanged < shared * PAGE_SIZE
        assert pool.stats().manifest_pages == shared + unchanged // PAGE_SIZE
        assert pool.verify() == []
        for loaded, segment_bytes in zip(held, spans, strict=True):
            assert loaded.shows() == segment_bytes  # the old image's bytes, still
            loaded.release()
        stats = pool.stats()
        assert (stats.hashtable_entries, stats.manifests, stats.references) == (0, 0, 0)
