"""``dksm bench boot``: real ``dksm run`` processes timed beside the bare interpreter,
first loads of the image beside loads of an image the pool already knows."""

from __future__ import annotations

from dksm.arch.layout import MIB
from dksm.bench.boot import measure_boot
from dksm.guests import resolve_image_path
from dksm.loader.elf import load_elf
from dksm.loader.segment import shareable_span
from dksm.memory.host_mapping import PAGE_SIZE

from conftest import dksm, requires_kvm


def _shareable_pages(guest: str, mem_mib: int) -> int:
    image = load_elf(resolve_image_path(guest), mem_mib * MIB)
    spans = (shareable_span(segment) for segment in image.segments)
    return sum((end - start) // PAGE_SIZE for start, end in spans if end > start)


@requires_kvm
def test_known_image_runs_take_the_whole_image_through_its_manifest() -> None:
    measured = measure_boot("hello", runs=2, keep_image_leased=True)
    names = [result.variant for result in measured.results]
    assert names == ["first load", "known image"]
    assert all(len(result.first_byte_ms) == 2 for result in measured.results)
    assert len(measured.interpreter_ms) == 2
    # Every read-only page of each known-image VM came from the held image's manifest.
    assert measured.manifest_pages_per_known_run == _shareable_pages("hello", 16) > 0


def test_keeping_the_image_leased_needs_the_pool() -> None:
    ran = dksm("bench", "boot", "--dedup", "none", "--keep-image-leased", "--runs", "1")
    assert ran.returncode == 1
    assert ran.stderr.splitlines() == [
        "dksm: error: --keep-image-leased holds the image in the page pool: it needs "
        "--dedup dksm or dksm+ksm, not none"
    ]
