"""Where each requested VM goes: the cluster's state and the placement policies.

Pure code (numpy, no Ray, no VM), shared by ``dksm cluster run`` and the simulator.

:class:`ClusterState` holds, per host, its capacity, the memory in use, the pages its
pool holds and, per (host, image), how many of the image's pages the pool lacks.  A
host's memory in use is its pool's pages plus every placed VM's private bytes
(:class:`dksm.cluster.catalog.Catalog`); a VM may go only where that stays within
the host's capacity, under every policy.

The policies, all selectable by name:

``sharing-aware``
    the host where the VM's marginal memory (its image pages that host's pool lacks,
    plus its private bytes) is smallest.  Ties go to the host with the most free
    memory (fairness: equally good hosts fill evenly, not the first one alone), then
    to the lowest host number, so a placement is reproducible.
``spread``
    the host with the most free memory, whatever it holds: what a scheduler that
    balances load does (Ray's ``SPREAD`` strategy spreads over nodes the same way).
``random``
    a host drawn uniformly among those with room (seeded).
``round-robin``
    the next host in turn that has room.

Placement is online: VMs are placed one at a time in the order requested, each
seeing the pages and memory the VMs before it took.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from dksm.cluster.catalog import Catalog, IntArray
from dksm.error import DksmError
from dksm.loader.segment import PAGE_SIZE

NO_HOST = -1
_NEVER = np.iinfo(np.int64).max  # the cost of a host without room


class PlacementError(DksmError):
    """A VM fits on no host, or a placement was asked something impossible."""


class ClusterState:
    """Hosts 0..h-1 with their capacity, memory in use and pool pages."""

    def __init__(
        self,
        catalog: Catalog,
        capacity: Sequence[int] | IntArray,
        held: Sequence[npt.NDArray[np.int32]] | None = None,
        used: Sequence[int] | None = None,
    ) -> None:
        """``held``: per host, the catalog page numbers its pool already holds;
        ``used``: per host, the memory already in use (default: those pages)."""
        self.catalog = catalog
        self.capacity: IntArray = np.array(capacity, dtype=np.int64)
        hosts = len(self.capacity)
        if hosts == 0:
            raise PlacementError("a cluster needs at least one host")
        self.held = np.zeros((hosts, catalog.pages), dtype=bool)
        # missing[image, host]: rows are read once per placement, so images come first
        self.missing: IntArray = np.repeat(catalog.page_counts[:, None], hosts, axis=1)
        self.vms: IntArray = np.zeros(hosts, dtype=np.int64)
        for host, ids in enumerate(held or ()):
            if len(ids):
                self.held[host, ids] = True
                self.missing[:, host] -= catalog.incidence[ids].sum(axis=0, dtype=np.int64)
        pool_bytes = self.held.sum(axis=1, dtype=np.int64) * PAGE_SIZE
        self.used: IntArray = pool_bytes if used is None else np.array(used, dtype=np.int64)
        self.free: IntArray = self.capacity - self.used

    @property
    def hosts(self) -> int:
        return len(self.capacity)

    def marginal(self, image: int) -> IntArray:
        """The memory placing one VM of ``image`` would add on each host."""
        cost: IntArray = self.missing[image] * PAGE_SIZE + self.catalog.private_bytes[image]
        return cost

    def admit(self, host: int, image: int) -> None:
        """Record a VM of ``image`` on ``host``: its missing pages enter that pool."""
        cost = int(self.missing[image, host]) * PAGE_SIZE + int(self.catalog.private_bytes[image])
        if cost > self.free[host]:
            raise PlacementError(
                f"host {host} has {self.free[host]} bytes free, a VM of "
                f"{self.catalog.labels[image]} needs {cost}"
            )
        ids = self.catalog.image_pages[image]
        new = ids[~self.held[host, ids]]
        if len(new):
            self.held[host, new] = True
            self.missing[:, host] -= self.catalog.incidence[new].sum(axis=0, dtype=np.int64)
        self.used[host] += cost
        self.free[host] -= cost
        self.vms[host] += 1

    def pool_pages(self) -> IntArray:
        pages: IntArray = self.held.sum(axis=1, dtype=np.int64)
        return pages

    def memory_bytes(self) -> int:
        return int(self.used.sum())

    def hosts_used(self) -> int:
        return int(np.count_nonzero(self.vms))


Policy = Callable[[ClusterState, int], int]
"""Chooses the host for one VM of an image (:data:`NO_HOST` when none has room)."""


def sharing_aware(state: ClusterState, image: int) -> int:
    cost = state.marginal(image)
    room = cost <= state.free
    if not room.any():
        return NO_HOST
    cost = np.where(room, cost, _NEVER)
    best = np.flatnonzero(cost == cost.min())
    if len(best) == 1:
        return int(best[0])
    return int(best[np.argmax(state.free[best])])  # argmax: the first of equals


def spread(state: ClusterState, image: int) -> int:
    room = state.marginal(image) <= state.free
    if not room.any():
        return NO_HOST
    return int(np.argmax(np.where(room, state.free, -1)))


class RandomPolicy:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, state: ClusterState, image: int) -> int:
        hosts = np.flatnonzero(state.marginal(image) <= state.free)
        return int(hosts[self.rng.integers(len(hosts))]) if len(hosts) else NO_HOST


class RoundRobin:
    def __init__(self) -> None:
        self.next = 0

    def __call__(self, state: ClusterState, image: int) -> int:
        missing = state.missing[image]
        private = int(state.catalog.private_bytes[image])
        for step in range(state.hosts):
            host = (self.next + step) % state.hosts
            if int(missing[host]) * PAGE_SIZE + private <= state.free[host]:
                self.next = host + 1
                return host
        return NO_HOST


POLICIES = ("sharing-aware", "spread", "random", "round-robin")


def policy(name: str, seed: int = 0) -> Policy:
    """A fresh policy by name (random and round-robin keep state between VMs)."""
    if name == "sharing-aware":
        return sharing_aware
    if name == "spread":
        return spread
    if name == "random":
        return RandomPolicy(seed)
    if name == "round-robin":
        return RoundRobin()
    raise PlacementError(f"unknown placement policy '{name}'; choose one of {', '.join(POLICIES)}")


def place(state: ClusterState, images: Sequence[int] | IntArray, chooser: Policy) -> IntArray:
    """Place one VM of each image in order; the host of each, :data:`NO_HOST` for a
    VM no host had room for (the VMs after it are still placed)."""
    hosts = np.full(len(images), NO_HOST, dtype=np.int64)
    for n, image in enumerate(images):
        host = chooser(state, int(image))
        if host != NO_HOST:
            state.admit(host, int(image))
            hosts[n] = host
    return hosts
