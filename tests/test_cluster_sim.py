"""``dksm cluster sim``: the placement code on a simulated cluster, through the real
command line, on catalogues made from the shipped guests' real page manifests."""

from __future__ import annotations

import json

from dksm.cluster.catalog import ImageManifest, VmCost, read_manifest
from dksm.cluster.simulation import SimulationSpec, scaled, simulate, variants
from dksm.guests import guest_path

from conftest import dksm

POLICIES = {"sharing-aware", "spread", "random", "round-robin"}


def test_json_has_exactly_the_issue_shape() -> None:
    result = dksm("cluster", "sim", "--hosts", "10", "--vms", "500", "--images", "20", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"policies"}
    assert set(doc["policies"]) == POLICIES
    for numbers in doc["policies"].values():
        assert set(numbers) == {"hosts_used", "memory_bytes", "saved_bytes", "placement_us_per_vm"}
        assert 1 <= numbers["hosts_used"] <= 10
        assert numbers["memory_bytes"] > 0 and numbers["saved_bytes"] > 0
        assert numbers["placement_us_per_vm"] > 0


def test_sharing_aware_needs_less_memory_than_spread_on_a_zipf_fleet() -> None:
    real = [read_manifest(guest_path(g), 16 << 20) for g in ("hello", "idle", "compute")]
    spec = SimulationSpec(hosts=20, vms=2000, images=40, image_scale=4, seed=3)
    result = simulate(spec, real)
    memory = {name: r.memory_bytes for name, r in result.policies.items()}
    assert memory["sharing-aware"] < min(m for name, m in memory.items() if name != "sharing-aware")
    for r in result.policies.values():
        assert r.memory_bytes + r.saved_bytes == result.unshared_bytes
        assert r.hosts_used <= spec.hosts


def test_variants_keep_part_of_their_parent() -> None:
    parent = read_manifest(guest_path("hello"), 16 << 20)
    made = variants([parent], 30, max_drift=0.5, seed=1)
    assert made[0] == parent
    for image in made[1:]:
        common = len(image.page_keys & parent.page_keys)
        assert len(image.page_keys) == len(parent.page_keys)
        assert common >= len(parent.page_keys) * 0.3  # drift at most 0.5, with slack
    assert len({m.page_keys for m in made}) > 25  # variants differ from each other


def test_scaling_keeps_overlaps_in_proportion() -> None:
    a = ImageManifest("a", frozenset({b"1" * 8, b"2" * 8}), 4096)
    b = ImageManifest("b", frozenset({b"2" * 8, b"3" * 8}), 0)
    sa, sb = scaled(a, 5), scaled(b, 5)
    assert len(sa.page_keys) == 10 and len(sa.page_keys & sb.page_keys) == 5
    assert sa.copied_bytes == 5 * 4096
    assert VmCost().overhead_bytes == 626 * 1024


def test_bad_simulation_input_is_one_line() -> None:
    result = dksm("cluster", "sim", "--hosts", "0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "dksm: error: hosts, VMs, images and the image scale must each be at least 1"
    ]
    tight = dksm("cluster", "sim", "--hosts", "2", "--vms", "100", "--host-memory-mib", "1")
    assert tight.returncode == 1
    assert "fit on none of 2 hosts" in tight.stderr and len(tight.stderr.splitlines()) == 1
