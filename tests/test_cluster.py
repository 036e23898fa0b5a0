"""``dksm cluster`` on a real local Ray cluster of three nodes, each node a host with
its own pool root: the same mixed fleet of shipped guests placed by spread and by
the sharing-aware policy, side by side; VMs and pool pages where placement said; a
host whose agent is killed takes its VMs and pool pages with it, its VMs are placed
again elsewhere, and ``down`` leaves no process, pool or Ray file behind."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dksm.cluster.catalog import read_manifest
from dksm.dedup.pool import PagePool, PoolMissingError
from dksm.guests import guest_path

from conftest import SHM, dksm, requires_kvm

pytest.importorskip("ray", reason="needs Ray (pip install 'dksm[cluster]')")

pytestmark = requires_kvm

IMAGES = ("hello", "idle", "compute", "cowprobe")
FLEET = [a for image in IMAGES for a in ("--image", image)]
BOOT_ARGS = "console=ttyS0 then=idle"  # hello and compute stay up once done
MEM_MIB = 16


def _processes_naming(*words: bytes) -> set[int]:
    """Processes whose command line holds any of ``words`` right now."""
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if any(w in cmdline for w in words):
                found.add(int(pid))
    return found


def _ray_processes() -> set[int]:
    """Ray processes of dksm's local clusters (their session lives in dksm-ray-*)."""
    return _processes_naming(b"/dksm-ray-")


@pytest.fixture
def cluster_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A cluster directory and pool base of this test's own; ``down`` on every path."""
    pool_base = tempfile.mkdtemp(prefix="dksm-test-cluster-", dir=SHM)
    env = {**os.environ, "DKSM_CLUSTER_DIR": str(tmp_path / "cluster")}
    ray_before = _ray_processes()
    yield {**env, "POOL_BASE": pool_base}
    if (tmp_path / "cluster" / "cluster.json").exists():
        dksm("cluster", "down", env=env, timeout=180)
    leftovers = sorted(Path(pool_base).iterdir())
    os.rmdir(pool_base) if not leftovers else None
    assert leftovers == []
    assert _ray_processes() <= ray_before


def _cluster(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    result = dksm("cluster", *args, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _up(env: dict[str, str]) -> None:
    _cluster(env, "up", "--local-nodes", "3", "--pool-base", env["POOL_BASE"],
             "--host-memory-mib", "256")  # fmt: skip


def _status(env: dict[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_cluster(env, "status", "--json"))
    return doc


def _pool_keys(root: Path) -> frozenset[bytes]:
    try:
        with PagePool.open("default", root, create=False) as pool:
            return pool.held_keys()
    except PoolMissingError:
        return frozenset()


def _run_and_check(env: dict[str, str], policy: str) -> tuple[int, int]:
    """Place the fleet with ``policy``; check VMs and pool pages are where the
    placement put them; the fleet's (memory, pool pages) over every host."""
    _up(env)
    _cluster(env, "run", *FLEET, "--instances", "2", "--policy", policy,
             "--mem-mib", str(MEM_MIB), "--boot-args", BOOT_ARGS)  # fmt: skip
    record = json.loads((Path(env["DKSM_CLUSTER_DIR"]) / "cluster.json").read_text())
    placed = Counter((vm["host"], vm["label"]) for vm in record["vms"])
    status = _status(env)
    manifests = {i: read_manifest(guest_path(i), MEM_MIB << 20) for i in IMAGES}
    memory = pages = 0
    for host, seen in status["hosts"].items():
        assert seen["alive"]
        assert Counter((host, label) for label in seen["vm_labels"]) == Counter(
            {k: n for k, n in placed.items() if k[0] == host}
        )
        keys = _pool_keys(Path(env["POOL_BASE"]) / host)
        wanted = set().union(*(manifests[lab].page_keys for (h, lab) in placed if h == host))
        assert keys == wanted  # exactly the pages of the images placed there
        assert seen["pool_pages"] == len(keys)
        memory += seen["memory_bytes"]
        pages += seen["pool_pages"]
    return memory, pages


def test_sharing_aware_uses_less_memory_than_spread(cluster_env: dict[str, str]) -> None:
    spread_memory, spread_pages = _run_and_check(cluster_env, "spread")
    _cluster(cluster_env, "down")
    aware_memory, aware_pages = _run_and_check(cluster_env, "sharing-aware")
    _cluster(cluster_env, "down")
    assert aware_pages < spread_pages
    assert aware_memory < spread_memory


@pytest.mark.parametrize("policy", ["random", "round-robin"])
def test_every_policy_places_where_it_says(cluster_env: dict[str, str], policy: str) -> None:
    _run_and_check(cluster_env, policy)


def test_a_lost_host_leaves_nothing_and_its_vms_are_placed_again(
    cluster_env: dict[str, str],
) -> None:
    env = cluster_env
    _run_and_check(env, "round-robin")
    before = _status(env)
    victim = "host-1"
    vm_pids = before["hosts"][victim]["vm_pids"]
    assert vm_pids
    os.kill(before["hosts"][victim]["agent_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in vm_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in vm_pids)
    assert _pool_keys(Path(env["POOL_BASE"]) / victim) == frozenset()  # no page left
    after = _status(env)
    assert not after["hosts"][victim]["alive"]
    lost = [vm for vm in after["lost_vms"] if vm["host"] == victim]
    assert len(lost) == before["hosts"][victim]["vms"]
    # The survivors kept theirs, untouched.
    for host in ("host-0", "host-2"):
        assert after["hosts"][host]["vm_pids"] == before["hosts"][host]["vm_pids"]
    _cluster(env, "run", "--replace-lost", "--instances", "0", "--policy", "sharing-aware",
             "--mem-mib", str(MEM_MIB))  # fmt: skip
    again = _status(env)
    assert again["lost_vms"] == []
    total = sum(h["vms"] for h in again["hosts"].values() if h["alive"])
    assert total == sum(h["vms"] for h in before["hosts"].values())
    _cluster(env, "down")
    assert _processes_naming(env["DKSM_CLUSTER_DIR"].encode()) == set()


def test_run_without_a_cluster_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "DKSM_CLUSTER_DIR": str(tmp_path / "none")}
    result = dksm("cluster", "run", "--image", "idle", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"dksm: error: no cluster is up ({tmp_path / 'none' / 'cluster.json'} does not exist):"
        " dksm cluster up"
    ]
