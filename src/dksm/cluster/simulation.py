"""``dksm cluster sim``: the placement code on a simulated cluster, without Ray or VMs.

The fleet: ``vms`` requests, each for an image drawn from a Zipf distribution over
``images`` images (rank r chosen with probability proportional to 1/r^s), in random
order.  The images are made from real page manifests: the real images themselves,
then variants of them, each a real image with a fraction of its shareable pages
(uniform in [0, ``max_drift``]) replaced by pages of its own, as a rebuild or a new
version of an application changes some of its code and keeps the rest.  Variants of
one image thus share most of their pages, variants of images built from one kit
share the kit's pages, and images of different kits share what the real ones do.

``image_scale`` K stands for images K times the size of the real ones (the shipped
guests hold 0.2-0.5 MiB of shareable pages, a Unikraft nginx or redis several MiB):
each real page becomes K pages, derived from it, so overlaps keep their proportions.

Every host has the same capacity; by default the fleet's memory without any sharing
spread evenly over the hosts, so that every policy fits and the memory a policy
saves is what it has to spare.  Per policy:

``memory_bytes``
    the memory in use on all hosts once the fleet is placed on the whole cluster
    (pool pages of every host plus every VM's private bytes);
``saved_bytes``
    the fleet's memory without sharing minus ``memory_bytes``;
``hosts_used``
    the fewest hosts of that capacity on which the policy places the whole fleet
    (found by bisection: a policy that fits on n hosts is assumed to fit on more);
``placement_us_per_vm``
    the wall-clock time of placing the fleet on the whole cluster, per VM.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dksm.cluster.catalog import Catalog, ImageManifest, VmCost
from dksm.cluster.placement import NO_HOST, POLICIES, ClusterState, PlacementError, place, policy


@dataclass(frozen=True)
class SimulationSpec:
    hosts: int = 1000
    vms: int = 100_000
    images: int = 300
    zipf_s: float = 1.0
    max_drift: float = 0.5
    image_scale: int = 1
    host_bytes: int | None = None  # None: the fleet without sharing over the hosts
    cost: VmCost = field(default_factory=VmCost)
    seed: int = 0

    def check(self) -> None:
        if min(self.hosts, self.vms, self.images, self.image_scale) < 1:
            raise PlacementError("hosts, VMs, images and the image scale must each be at least 1")
        if self.zipf_s < 0 or not 0 <= self.max_drift <= 1:
            raise PlacementError("the Zipf exponent must be >= 0 and the drift within [0, 1]")
        if self.host_bytes is not None and self.host_bytes <= 0:
            raise PlacementError("host memory must be positive")


@dataclass(frozen=True)
class PolicyResult:
    hosts_used: int
    memory_bytes: int
    saved_bytes: int
    placement_us_per_vm: float

    def to_json(self) -> dict[str, int | float]:
        return {
            "hosts_used": self.hosts_used,
            "memory_bytes": self.memory_bytes,
            "saved_bytes": self.saved_bytes,
            "placement_us_per_vm": round(self.placement_us_per_vm, 2),
        }


@dataclass(frozen=True)
class Simulation:
    spec: SimulationSpec
    host_bytes: int
    unshared_bytes: int
    catalog_pages: int
    policies: dict[str, PolicyResult]

    def to_json(self) -> dict[str, object]:
        return {"policies": {name: r.to_json() for name, r in self.policies.items()}}


def variants(
    real: Sequence[ImageManifest], count: int, max_drift: float, seed: int
) -> list[ImageManifest]:
    """``count`` images: the real ones first, then variants of them (module docstring)."""
    if not real:
        raise PlacementError("the simulation needs at least one real image")
    rng = np.random.default_rng(seed)
    made = list(real[:count])
    while len(made) < count:
        parent = real[len(made) % len(real)]
        keys = sorted(parent.page_keys)
        drift = rng.uniform(0, max_drift)
        changed = rng.random(len(keys)) < drift
        own = {bytes(rng.bytes(8)) for _ in range(int(changed.sum()))}
        kept = {k for k, c in zip(keys, changed, strict=True) if not c}
        made.append(
            ImageManifest(f"{parent.label}~{len(made)}", frozenset(kept | own), parent.copied_bytes)
        )
    return made


def scaled(image: ImageManifest, factor: int) -> ImageManifest:
    """``image`` as if each of its pages were ``factor`` pages (module docstring)."""
    if factor == 1:
        return image
    keys = {
        hashlib.blake2b(key + n.to_bytes(4, "little"), digest_size=8).digest()
        for key in image.page_keys
        for n in range(factor)
    }
    return ImageManifest(image.label, frozenset(keys), image.copied_bytes * factor)


def zipf_requests(images: int, vms: int, s: float, seed: int) -> np.ndarray:
    """``vms`` image numbers, rank r drawn with probability ~ 1/r^s, ranks shuffled
    over the images so that popularity does not follow the order they were made in."""
    rng = np.random.default_rng(seed + 1)
    weights = 1.0 / np.arange(1, images + 1) ** s
    by_rank = rng.permutation(images)
    return np.asarray(by_rank[rng.choice(images, size=vms, p=weights / weights.sum())])


def _fits(
    catalog: Catalog, requests: np.ndarray, name: str, hosts: int, host_bytes: int, seed: int
) -> bool:
    state = ClusterState(catalog, np.full(hosts, host_bytes, dtype=np.int64))
    return bool((place(state, requests, policy(name, seed)) != NO_HOST).all())


def fewest_hosts(
    catalog: Catalog,
    requests: np.ndarray,
    name: str,
    spec: SimulationSpec,
    host_bytes: int,
    lower: int,
    guess: int,
) -> int:
    """The fewest hosts on which policy ``name`` places every request: bisection
    between ``lower`` and ``guess`` (the hosts its memory on the whole cluster fills,
    where it usually fits), else between ``guess`` and ``spec.hosts``, where it fits."""
    lo, hi = max(1, lower), spec.hosts
    if lo <= guess < hi:
        if _fits(catalog, requests, name, guess, host_bytes, spec.seed):
            hi = guess
        else:
            lo = guess + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(catalog, requests, name, mid, host_bytes, spec.seed):
            hi = mid
        else:
            lo = mid + 1
    return hi


def simulate(
    spec: SimulationSpec, real: Sequence[ImageManifest], names: Sequence[str] = POLICIES
) -> Simulation:
    spec.check()
    real = [scaled(image, spec.image_scale) for image in real]
    catalog = Catalog(variants(real, spec.images, spec.max_drift, spec.seed), spec.cost)
    requests = zipf_requests(catalog.images, spec.vms, spec.zipf_s, spec.seed)
    per_image = np.bincount(requests, minlength=catalog.images)
    unshared = int(sum(int(n) * catalog.unshared_bytes(i) for i, n in enumerate(per_image) if n))
    host_bytes = spec.host_bytes or -(-unshared // spec.hosts)
    # No placement can need less than every VM's private bytes and each page once.
    used_pages = np.unique(
        np.concatenate([catalog.image_pages[i] for i in np.flatnonzero(per_image)])
    )
    floor = int((per_image * catalog.private_bytes).sum()) + len(used_pages) * 4096
    results: dict[str, PolicyResult] = {}
    for name in names:
        state = ClusterState(catalog, np.full(spec.hosts, host_bytes, dtype=np.int64))
        started = time.perf_counter()
        hosts = place(state, requests, policy(name, spec.seed))
        elapsed = time.perf_counter() - started
        unplaced = int(np.count_nonzero(hosts == NO_HOST))
        if unplaced:
            raise PlacementError(
                f"{name}: {unplaced} of {spec.vms} VMs fit on none of {spec.hosts} hosts of "
                f"{host_bytes} bytes; give the hosts more memory"
            )
        results[name] = PolicyResult(
            hosts_used=fewest_hosts(
                catalog,
                requests,
                name,
                spec,
                host_bytes,
                -(-floor // host_bytes),
                -(-state.memory_bytes() // host_bytes),
            ),
            memory_bytes=state.memory_bytes(),
            saved_bytes=unshared - state.memory_bytes(),
            placement_us_per_vm=elapsed / spec.vms * 1e6,
        )
    return Simulation(spec, host_bytes, unshared, catalog.pages, results)
