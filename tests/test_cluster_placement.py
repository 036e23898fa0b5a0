"""The placement policies, alone: pure code on generated clusters and fleets.

Properties every policy keeps (never over a host's capacity, memory accounted
exactly, a VM left out only when no host had room), and what sets the
sharing-aware policy apart (repeat instances cost no pages; on fleets whose images
overlap, it needs no more memory than any other policy)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dksm.cluster.catalog import Catalog, ImageManifest, VmCost
from dksm.cluster.placement import (
    NO_HOST,
    POLICIES,
    ClusterState,
    PlacementError,
    place,
    policy,
)
from dksm.loader.segment import PAGE_SIZE

COST = VmCost(guest_bytes=8 * PAGE_SIZE, overhead_bytes=16 * PAGE_SIZE)


def key(n: int) -> bytes:
    return n.to_bytes(8, "big")


@st.composite
def catalogs(draw: st.DrawFn, overlap: bool = False) -> Catalog:
    """Images over a small page universe; with ``overlap`` every image holds page 0
    and a common base, as images linked from one kit do."""
    count = draw(st.integers(1, 6))
    manifests = []
    for n in range(count):
        pages = draw(st.sets(st.integers(0, 40), max_size=24))
        if overlap:
            pages |= set(range(10))
        copied = draw(st.integers(0, 4)) * PAGE_SIZE
        manifests.append(ImageManifest(f"img{n}", frozenset(key(p) for p in pages), copied))
    return Catalog(manifests, COST)


def recomputed_used(
    state: ClusterState, catalog: Catalog, placed: list[tuple[int, int]]
) -> list[int]:
    pools: list[set[int]] = [set() for _ in range(state.hosts)]
    private = [0] * state.hosts
    for host, image in placed:
        pools[host].update(int(p) for p in catalog.image_pages[image])
        private[host] += int(catalog.private_bytes[image])
    return [len(pools[h]) * PAGE_SIZE + private[h] for h in range(state.hosts)]


@given(
    catalog=catalogs(),
    capacities=st.lists(st.integers(0, 200 * PAGE_SIZE), min_size=1, max_size=6),
    data=st.data(),
    name=st.sampled_from(POLICIES),
)
def test_no_policy_ever_fills_a_host_past_its_capacity(
    catalog: Catalog, capacities: list[int], data: st.DataObject, name: str
) -> None:
    requests = data.draw(st.lists(st.integers(0, catalog.images - 1), max_size=40))
    state = ClusterState(catalog, capacities)
    hosts = place(state, requests, policy(name, seed=1))
    assert (state.used <= state.capacity).all()
    placed = [(int(h), r) for h, r in zip(hosts, requests, strict=True) if h != NO_HOST]
    assert state.used.tolist() == recomputed_used(state, catalog, placed)
    assert state.vms.sum() == len(placed)
    # A VM was left out only if, at its turn, it fitted nowhere: replaying the
    # placement up to it shows every host short of room.
    replay = ClusterState(catalog, capacities)
    for host, image in zip(hosts, requests, strict=True):
        if host == NO_HOST:
            assert (replay.marginal(image) > replay.free).all()
        else:
            replay.admit(int(host), image)


@given(catalog=catalogs(overlap=True), hosts=st.integers(2, 6), data=st.data())
def test_sharing_aware_needs_the_least_memory_when_images_overlap(
    catalog: Catalog, hosts: int, data: st.DataObject
) -> None:
    """With room everywhere, every image sharing the kit's pages lands beside the
    others: each page is held once, which no placement can beat."""
    requests = data.draw(st.lists(st.integers(0, catalog.images - 1), min_size=1, max_size=40))
    capacity = [10**12] * hosts
    memory = {}
    for name in POLICIES:
        state = ClusterState(catalog, capacity)
        place(state, requests, policy(name, seed=2))
        memory[name] = state.memory_bytes()
    pages = set().union(*(set(catalog.image_pages[r].tolist()) for r in requests))
    floor = len(pages) * PAGE_SIZE + sum(int(catalog.private_bytes[r]) for r in requests)
    assert memory["sharing-aware"] == floor
    assert all(memory["sharing-aware"] <= m for m in memory.values())


@given(catalog=catalogs(), hosts=st.integers(1, 6), data=st.data())
def test_a_repeat_instance_costs_sharing_aware_no_page(
    catalog: Catalog, hosts: int, data: st.DataObject
) -> None:
    image = data.draw(st.integers(0, catalog.images - 1))
    state = ClusterState(catalog, [10**12] * hosts)
    place(state, [image], policy("sharing-aware"))
    pages = int(state.pool_pages().sum())
    place(state, [image] * 5, policy("sharing-aware"))
    assert int(state.pool_pages().sum()) == pages
    if pages:  # an image with no shareable page is as cheap anywhere: it spreads
        assert state.hosts_used() == 1


def test_ties_go_to_the_host_with_the_most_room() -> None:
    """Equally cheap hosts fill evenly (fairness), the lowest-numbered first."""
    catalog = Catalog([ImageManifest("a", frozenset({key(1)}), 0)], COST)
    per_vm = catalog.unshared_bytes(0)
    state = ClusterState(catalog, [10 * per_vm, 10 * per_vm, 10 * per_vm])
    state.admit(1, 0)  # host 1 holds the page: the cheapest until it is full
    hosts = place(state, [0] * 3, policy("sharing-aware"))
    assert hosts.tolist() == [1, 1, 1]
    other = ClusterState(Catalog([ImageManifest("b", frozenset(), 0)], COST), [5, 9, 9])
    other.capacity[:] = other.free[:] = [3 * per_vm, 5 * per_vm, 5 * per_vm]
    assert place(other, [0] * 4, policy("sharing-aware")).tolist() == [1, 2, 1, 2]


@pytest.mark.parametrize("name", ["spread", "round-robin"])
def test_balancing_policies_keep_hosts_within_one_vm(name: str) -> None:
    catalog = Catalog([ImageManifest("a", frozenset({key(1), key(2)}), 0)], COST)
    state = ClusterState(catalog, [10**12] * 4)
    place(state, [0] * 10, policy(name))
    assert state.vms.max() - state.vms.min() <= 1


def test_random_is_reproducible_by_seed() -> None:
    catalog = Catalog([ImageManifest("a", frozenset({key(1)}), 0)], COST)
    runs = [
        place(ClusterState(catalog, [10**12] * 8), [0] * 30, policy("random", s)) for s in (5, 5, 6)
    ]
    assert runs[0].tolist() == runs[1].tolist() != runs[2].tolist()


def test_unknown_policy_is_named() -> None:
    with pytest.raises(PlacementError, match="unknown placement policy 'packed'; choose one of"):
        policy("packed")
