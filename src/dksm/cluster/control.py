"""The work of ``dksm cluster up|run|status|down`` on a Ray cluster.

The cluster's record (``cluster.json`` in the cluster directory: ``DKSM_CLUSTER_DIR``,
else ``cluster`` beside the fleets' runtime root) names the Ray address, the local
keeper if ``up`` started one, each host with its pool root and fleet directory, and
every VM placed with its host and fleet.  Each host has a detached agent actor named
after it (:mod:`dksm.cluster.agent`), pinned to its node; a host whose agent no
longer answers is *lost*, and so are the VMs placed on it: ``status`` lists them and
``run --replace-lost`` places them again on the hosts that remain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from dksm.analyze.pages import unique_labels
from dksm.cluster import local
from dksm.cluster.catalog import Catalog, VmCost, read_manifest
from dksm.cluster.placement import NO_HOST, ClusterState, PlacementError, place, policy
from dksm.dedup.pool import PagePool, PoolMissingError, pool_root
from dksm.error import DksmError
from dksm.fleet.control import all_fleets, runtime_root
from dksm.fleet.directory import LIVE_STATES, write_json_atomically
from dksm.fleet.instance import DEFAULT_DOMAIN
from dksm.loader.segment import PAGE_SIZE
from dksm.vmm.config import DEFAULT_BOOT_ARGS

STATE_FILE = "cluster.json"
NAMESPACE = "dksm"
CALL_TIMEOUT = 60.0


class ClusterError(DksmError):
    """The cluster is not up, not reachable, or was asked something it cannot do."""


def cluster_dir() -> Path:
    env = os.environ.get("DKSM_CLUSTER_DIR")
    return Path(env) if env else runtime_root().parent / "cluster"


def _load() -> dict[str, Any]:
    path = cluster_dir() / STATE_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"no cluster is up ({path} does not exist): dksm cluster up") from None
    except ValueError as exc:
        raise ClusterError(f"the cluster record {path} is unreadable: {exc}") from None
    return doc


def _save(state: dict[str, Any]) -> None:
    write_json_atomically(cluster_dir() / STATE_FILE, state)


@cache
def agent_class() -> Any:
    import ray

    from dksm.cluster.agent import HostAgent

    return ray.remote(HostAgent)


def _connect(state: dict[str, Any]) -> None:
    import ray

    if state.get("ray_tmpdir"):
        os.environ["RAY_TMPDIR"] = state["ray_tmpdir"]
    if ray.is_initialized():
        return
    try:
        ray.init(
            address=state["address"],
            namespace=NAMESPACE,
            logging_level=logging.ERROR,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {state['address']}: {exc}") from None


def _agent(host: str) -> Any:
    import ray

    return ray.get_actor(f"agent-{host}", namespace=NAMESPACE)


def _call(calls: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
    """Wait for one call per host; a host whose agent is gone answers None."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    answers: dict[str, Any] = {}
    for host, ref in calls.items():
        try:
            answers[host] = ray.get(ref, timeout=timeout)
        except (RayActorError, GetTimeoutError):
            answers[host] = None
    return answers


def _live_agents(state: dict[str, Any]) -> dict[str, Any]:
    agents = {}
    for host in state["hosts"]:
        with contextlib.suppress(ValueError):  # no such actor: it died
            agents[host] = _agent(host)
    return agents


def up(
    address: str | None,
    nodes: int,
    pool_base: str | None,
    host_memory: int | None,
    domain: str = DEFAULT_DOMAIN,
) -> dict[str, Any]:
    """Connect to ``address`` (or start a local cluster of ``nodes`` nodes) and start
    an agent on every node; the cluster's record."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    directory = cluster_dir()
    if (directory / STATE_FILE).exists():
        raise ClusterError(f"a cluster is already up (recorded in {directory}): dksm cluster down")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keeper = local.start(directory, nodes) if address is None else None
    state: dict[str, Any] = {
        "address": keeper["address"] if keeper else address,
        "keeper": keeper,
        "ray_tmpdir": keeper["ray_tmpdir"] if keeper else None,
        "domain": domain,
        "host_memory": host_memory,
        "hosts": {},
        "vms": [],
    }
    _save(state)
    try:
        import ray

        _connect(state)
        if pool_base is None and keeper is not None:  # hosts on one machine: a root each
            pool_base = str(pool_root()) + "-cluster"
        base = None if pool_base is None else pool_root(pool_base)
        agents = {}
        nodes_seen: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        for node in sorted(nodes_seen, key=lambda n: n["Labels"].get(local.HOST_LABEL, "")):
            if not node["Alive"]:
                continue
            host = node["Labels"].get(local.HOST_LABEL) or f"node-{node['NodeID'][:12]}"
            record = {
                "node_id": node["NodeID"],
                "pool_root": None if base is None else str(base / host),
                "run_dir": str(directory / "hosts" / host),
            }
            state["hosts"][host] = record
            agents[host] = (
                agent_class()
                .options(
                    name=f"agent-{host}",
                    namespace=NAMESPACE,
                    lifetime="detached",
                    num_cpus=0,
                    max_restarts=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                )
                .remote(host, record["pool_root"], record["run_dir"], domain)
            )
        pids = _call({h: a.pid.remote() for h, a in agents.items()})
        for host, pid in pids.items():
            if pid is None:
                raise ClusterError(f"the agent of host {host} did not start")
            state["hosts"][host]["agent_pid"] = pid
        _save(state)
    except BaseException:
        down()
        raise
    return state


def _image_keys(manifests: dict[str, Any]) -> dict[str, list[bytes]]:
    return {label: sorted(m.page_keys) for label, m in manifests.items()}


def run(
    images: Sequence[str],
    instances: int,
    policy_name: str,
    mem_mib: int,
    replace_lost: bool = False,
    boot_timeout: float = 120.0,
    seed: int = 0,
    boot_args: str = DEFAULT_BOOT_ARGS,
) -> list[dict[str, Any]]:
    """Place ``instances`` VMs of each image (and, with ``replace_lost``, the VMs of
    lost hosts) with the named policy and start them; the VMs placed."""
    from dksm.guests import resolve_image

    chooser = policy(policy_name, seed)
    if instances < 0 or (instances == 0 and not replace_lost):
        raise ClusterError(f"--instances must be at least 1, not {instances}")
    state = _load()
    _connect(state)
    agents = _live_agents(state)
    requests = [(str(resolve_image(i)), boot_args) for i in images for _ in range(instances)]
    lost = [vm for vm in state["vms"] if vm["host"] not in agents]
    if replace_lost:
        requests += [(vm["image"], vm["boot_args"]) for vm in lost]
        state["vms"] = [vm for vm in state["vms"] if vm["host"] in agents]
    if not requests:
        return []
    if not agents:
        raise ClusterError("no host of the cluster answers: every agent is gone")
    paths = sorted({path for path, _ in requests})
    labels = dict(zip(paths, unique_labels(Path(p) for p in paths), strict=True))
    manifests = {labels[p]: read_manifest(Path(p), mem_mib << 20, labels[p]) for p in paths}
    catalog = Catalog(list(manifests.values()), VmCost())
    hosts = sorted(agents)
    reports = _call({h: agents[h].report.remote(_image_keys(manifests)) for h in hosts})
    hosts = [h for h in hosts if reports[h] is not None]
    held = [
        catalog.page_ids(k for keys in reports[h]["held"].values() for k in keys) for h in hosts
    ]
    overhead = VmCost().guest_bytes + VmCost().overhead_bytes
    used = [reports[h]["pool_pages"] * PAGE_SIZE + reports[h]["live_vms"] * overhead for h in hosts]
    if state.get("host_memory"):
        capacity = [int(state["host_memory"])] * len(hosts)
    else:
        capacity = [u + reports[h]["mem_available"] for u, h in zip(used, hosts, strict=True)]
    cluster = ClusterState(catalog, capacity, held, used)
    index = {label: n for n, label in enumerate(catalog.labels)}
    placed = place(cluster, [index[labels[p]] for p, _ in requests], chooser)
    unplaced = int((placed == NO_HOST).sum())
    if unplaced:
        raise PlacementError(f"{unplaced} of {len(requests)} VMs fit on none of {len(hosts)} hosts")
    by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (path, args), host in zip(requests, placed, strict=True):
        by_host[hosts[host]].append(
            {"image": path, "label": labels[path], "boot_args": args, "mem_mib": mem_mib}
        )
    started = _call(
        {h: agents[h].start.remote(vms, boot_timeout) for h, vms in by_host.items()},
        timeout=boot_timeout + CALL_TIMEOUT,
    )
    out = []
    for host, vms in by_host.items():
        fleet = started[host]
        for vm in vms:
            out.append({**vm, "host": host, "fleet": fleet, "policy": policy_name})
    state["vms"] += out
    _save(state)
    failed = [h for h, fleet in started.items() if fleet is None]
    if failed:
        raise ClusterError(f"host(s) {', '.join(failed)} did not start their VMs (agent lost)")
    return out


def status() -> dict[str, Any]:
    """Per host: alive, VMs, pool pages, memory, saved; and the VMs of lost hosts."""
    state = _load()
    _connect(state)
    agents = _live_agents(state)
    reports = _call({h: a.report.remote({}) for h, a in agents.items()})
    hosts: dict[str, Any] = {}
    for host in state["hosts"]:
        report = reports.get(host)
        placed = sum(1 for vm in state["vms"] if vm["host"] == host)
        if report is None:
            hosts[host] = {"alive": False, "vms": placed}
            continue
        hosts[host] = {
            "alive": True,
            "agent_pid": report["pid"],
            "vms": report["live_vms"],
            "pool_pages": report["pool_pages"],
            "memory_bytes": report["memory_bytes"],
            "saved_bytes": report["saved_bytes"],
            "vm_pids": sorted({vm["pid"] for vm in report["vms"] if vm["state"] in LIVE_STATES}),
            "vm_labels": sorted(vm["label"] for vm in report["vms"] if vm["state"] in LIVE_STATES),
        }
    lost = [vm for vm in state["vms"] if not hosts.get(vm["host"], {}).get("alive")]
    return {"address": state["address"], "hosts": hosts, "lost_vms": lost}


def _clean_locally(record: dict[str, Any], domain: str) -> list[str]:
    """A lost host of a local cluster: its VMs died with its agent; remove its pool
    and records from this machine."""
    left: list[str] = []
    run_dir = Path(record["run_dir"])
    for handle in all_fleets(run_dir):
        handle.down()
    root = record["pool_root"]
    if root and Path(root).is_dir():
        try:
            with contextlib.closing(PagePool.open(domain, root, create=False)) as pool:
                left += pool.purge()
        except PoolMissingError:
            pass
        with contextlib.suppress(OSError):
            Path(root).rmdir()
    shutil.rmtree(run_dir, ignore_errors=True)
    return left


def down() -> list[str]:
    """Stop every host's VMs, remove their pools, the agents and (if local) the Ray
    cluster; what was left behind."""
    import ray

    state = _load()
    left: list[str] = []
    try:
        _connect(state)
        agents = _live_agents(state)
        answers = _call({h: a.teardown.remote() for h, a in agents.items()}, timeout=120)
        for host, answer in answers.items():
            left += answer or []
            with contextlib.suppress(Exception):
                ray.kill(agents[host])
    except ClusterError:
        agents = {}
    finally:
        ray.shutdown()
        if state.get("keeper"):
            local.stop(state["keeper"])
            for host, record in state["hosts"].items():
                if host not in agents:
                    left += _clean_locally(record, state["domain"])
            base = Path(str(pool_root()) + "-cluster")
            with contextlib.suppress(OSError):
                base.rmdir()
    shutil.rmtree(cluster_dir(), ignore_errors=True)
    return left


__all__ = ["ClusterError", "cluster_dir", "down", "run", "status", "up"]
