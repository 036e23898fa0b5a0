"""What a fleet's guest images cost under each dedup mode, predicted from the files.

The model (pages of 4 KiB; ``N_i`` instances of image ``i``; only images with
``N_i > 0`` take part):

``hashtable_entries``
    ``E``, the number of distinct contents among the shareable pages of all the
    images.  This is what the page pool of one domain holds after the fleet
    loaded: it stores each distinct content once, whatever its address or image
    (identical pages within one image included), and nothing else.
``none``
    ``sum of N_i * L_i``, ``L_i`` the image's loaded pages (shareable, partial and
    writable: every page holding file bytes), each written privately into every
    instance.
``dksm``
    ``E + sum of N_i * (L_i - S_i)``, ``S_i`` the image's shareable pages: the
    pool's pages once (its tmpfs file holds exactly ``E`` pages), plus every page
    that loading copies into every instance.
``ksm`` (ideal)
    the number of distinct contents among *all* loaded pages of all the images,
    writable ones included: KSM after it has merged every identical page, with
    unlimited scanning time, before any guest writes.  All-zero pages count as one
    content (KSM merges them into one KSM page; with ``use_zero_pages`` they would
    map the zero page and cost nothing, which is ``zero_contents`` less).

Zero-fill pages (``.bss``) are not loaded, so they cost nothing in any mode.  Not
modelled, because no image file can tell: what guests touch as they run (boot
structures below 1 MiB, stack, ``.bss``), the copy-on-write copies made when a guest
writes a shared page, and the VMM processes themselves (interpreter, page tables,
KVM's structures).  A measurement that compares against this model must count the
image's pages only (see ``dksm.bench.layouts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dksm.analyze.pages import ZERO_PAGE, ImagePages, PageClass
from dksm.loader.segment import PAGE_SIZE


@dataclass(frozen=True)
class FleetPrediction:
    """Predicted guest-image pages of a fleet, by dedup mode (module docstring)."""

    instances: tuple[tuple[str, int], ...]  # (image label, N)
    hashtable_entries: int
    none_pages: int
    dksm_pages: int
    dksm_private_pages: int  # copied pages, summed over instances
    ksm_pages: int
    zero_contents: int  # 1 if an all-zero page is among the loaded pages, else 0

    @property
    def vms(self) -> int:
        return sum(n for _, n in self.instances)

    @property
    def pool_bytes(self) -> int:
        return self.hashtable_entries * PAGE_SIZE

    def bytes(self, mode: str) -> int:
        pages = {"none": self.none_pages, "dksm": self.dksm_pages, "ksm": self.ksm_pages}
        return pages[mode] * PAGE_SIZE

    def to_json(self) -> dict[str, object]:
        return {
            "instances": dict(self.instances),
            "vms": self.vms,
            "hashtable_entries": self.hashtable_entries,
            "pool_bytes": self.pool_bytes,
            "pages": {"none": self.none_pages, "dksm": self.dksm_pages, "ksm": self.ksm_pages},
            "bytes": {mode: self.bytes(mode) for mode in ("none", "dksm", "ksm")},
            "dksm_private_pages": self.dksm_private_pages,
            "ksm_zero_contents": self.zero_contents,
        }


def predict_fleet(images: Sequence[ImagePages], counts: Sequence[int]) -> FleetPrediction:
    """The fleet with ``counts[i]`` instances of ``images[i]``."""
    if len(counts) != len(images):
        raise ValueError(f"{len(counts)} instance counts for {len(images)} images")
    pool: set[bytes] = set()
    everything: set[bytes] = set()
    none = private = 0
    for img, n in zip(images, counts, strict=True):
        if n <= 0:
            continue
        loaded = img.loaded
        shareable = [p for p in loaded if p.cls is PageClass.SHAREABLE]
        pool.update(p.content for p in shareable if p.content is not None)
        everything.update(p.content for p in loaded if p.content is not None)
        none += n * len(loaded)
        private += n * (len(loaded) - len(shareable))
    return FleetPrediction(
        instances=tuple((img.label, n) for img, n in zip(images, counts, strict=True)),
        hashtable_entries=len(pool),
        none_pages=none,
        dksm_pages=len(pool) + private,
        dksm_private_pages=private,
        ksm_pages=len(everything),
        zero_contents=int(ZERO_PAGE in everything),
    )
