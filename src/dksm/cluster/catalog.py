"""Images as placement sees them.

Placing a VM on a host costs that host its *marginal memory*: the image's shareable
pages the host's pool does not hold yet, plus what every instance costs on its own
(the image pages loading copies, the RAM the guest touches, the VMM process).  A
:class:`ImageManifest` carries the first as the pool keys of the image's shareable
pages (:func:`dksm.dedup.pool.page_key`, read with the loader's own rules by
:mod:`dksm.analyze.pages`) and the copied pages as bytes; :class:`VmCost` the rest.
A :class:`Catalog` numbers the pages of a set of images once, so that placement
works on integer arrays instead of sets of keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dksm.analyze.pages import PageClass, read_image
from dksm.dedup.pool import page_key
from dksm.loader.segment import PAGE_SIZE

KIB = 1024
# Measured by `dksm bench density` (BENCHMARKS.md): 626 KiB of VMM overhead per VM at
# 64 idle VMs with 8 per worker process, and tens of KiB (34-74) of guest memory an
# idle shipped guest touches beyond its image.
MEASURED_OVERHEAD_BYTES = 626 * KIB
MEASURED_IDLE_GUEST_BYTES = 64 * KIB

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ImageManifest:
    """One image: the pool keys of its shareable pages, and the bytes of the pages
    loading copies into every instance (partial and writable pages)."""

    label: str
    page_keys: frozenset[bytes]
    copied_bytes: int


@dataclass(frozen=True)
class VmCost:
    """What an instance costs besides its image: the guest RAM it touches and its
    share of the VMM processes."""

    guest_bytes: int = MEASURED_IDLE_GUEST_BYTES
    overhead_bytes: int = MEASURED_OVERHEAD_BYTES


def read_manifest(path: Path, mem_size: int, label: str | None = None) -> ImageManifest:
    """The manifest of the image at ``path``, checked by the loader for a guest of
    ``mem_size`` bytes (a bad image fails with the loader's error)."""
    pages = read_image(path, mem_size, label)
    keys = frozenset(
        page_key(p.content)
        for p in pages.pages
        if p.cls is PageClass.SHAREABLE and p.content is not None
    )
    copied = sum(1 for p in pages.pages if p.cls.loaded and p.cls is not PageClass.SHAREABLE)
    return ImageManifest(pages.label, keys, copied * PAGE_SIZE)


class Catalog:
    """Images numbered 0..n-1 and their distinct pages numbered 0..p-1.

    ``incidence[page, image]`` is 1 where the image holds the page: adding a set of
    pages to a host lowers each image's missing count there by the sum of their rows.
    """

    def __init__(self, manifests: Sequence[ImageManifest], cost: VmCost) -> None:
        if not manifests:
            raise ValueError("a catalog needs at least one image")
        self.labels = tuple(m.label for m in manifests)
        self.cost = cost
        self.key_ids: dict[bytes, int] = {}
        pages: list[npt.NDArray[np.int32]] = []
        for m in manifests:
            numbers = [self.key_ids.setdefault(k, len(self.key_ids)) for k in sorted(m.page_keys)]
            pages.append(np.array(sorted(numbers), dtype=np.int32))
        self.image_pages = tuple(pages)
        self.page_counts: IntArray = np.array([len(p) for p in pages], dtype=np.int64)
        self.private_bytes: IntArray = np.array(
            [m.copied_bytes + cost.guest_bytes + cost.overhead_bytes for m in manifests],
            dtype=np.int64,
        )
        self.incidence = np.zeros((len(self.key_ids), len(manifests)), dtype=np.uint8)
        for image, ids in enumerate(pages):
            self.incidence[ids, image] = 1

    @property
    def images(self) -> int:
        return len(self.labels)

    @property
    def pages(self) -> int:
        return len(self.key_ids)

    def page_ids(self, keys: Iterable[bytes]) -> npt.NDArray[np.int32]:
        """The numbers of the keys this catalog knows (others cannot matter to it)."""
        found = [self.key_ids[k] for k in keys if k in self.key_ids]
        return np.array(sorted(found), dtype=np.int32)

    def unshared_bytes(self, image: int) -> int:
        """What an instance costs where nothing is shared: all its pages and the rest."""
        return int(self.page_counts[image]) * PAGE_SIZE + int(self.private_bytes[image])
