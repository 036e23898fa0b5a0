"""The device benchmarks run end to end at small sizes and report what they measure:
a guest moving bytes through virtio-block, round trips to a guest, an initrd
costing a fleet less with the pool, and a shared read-only drive held once in the
host's page cache."""

from __future__ import annotations

import json
from typing import Any

from conftest import dksm, requires_kvm, requires_root


def bench(*args: str) -> dict[str, Any]:
    result = dksm("bench", *args, "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


@requires_kvm
def test_bench_block_moves_bytes_both_ways() -> None:
    doc = bench("block", "--size-mib", "8", "--runs", "1")
    assert doc["size_mib"] == 8
    for key in ("host_read_mib_s", "guest_read_mib_s", "host_write_mib_s", "guest_write_mib_s"):
        assert doc[key] > 0, key


@requires_kvm
@requires_root
def test_bench_net_times_round_trips_on_every_path() -> None:
    doc = bench("net", "--count", "5")
    for key in ("icmp_ms", "udp_ms", "vsock_ms"):
        low, median, high = doc[key]
        assert 0 < low <= median <= high, (key, doc[key])


@requires_kvm
@requires_root
def test_bench_initrd_sharing_saves_about_the_copies() -> None:
    doc = bench("initrd-sharing", "--instances", "3", "--initrd-mib", "2")
    none, pooled = doc["rows"]
    assert (none["mode"], pooled["mode"]) == ("none", "dksm")
    # Two of the three initrd copies (4 MiB) are gone, give or take the image's pages.
    assert none["fleet_bytes"] - pooled["fleet_bytes"] >= 3.5 * (1 << 20)


@requires_kvm
@requires_root
def test_bench_drive_sharing_finds_the_drive_once_in_the_page_cache() -> None:
    doc = bench("drive-sharing", "--instances", "3", "--drive-mib", "4")
    assert doc["page_cache_before_bytes"] == 0
    assert doc["page_cache_after_bytes"] == 4 << 20
