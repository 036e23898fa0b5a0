"""A local Ray cluster: several Ray nodes on this machine, each standing for a host.

``dksm cluster up`` without an address starts a *keeper* process in its own session
that owns the nodes (Ray's ``cluster_utils.Cluster``) and shuts them down on
SIGTERM, so the cluster outlives the command and ``down`` stops exactly what ``up``
started, never another user's or another run's Ray.  Ray's files go to a temporary
directory of the keeper's (``RAY_TMPDIR``), removed when it stops.  Each node is
labelled with its host name, small (one CPU, an 80 MiB object store, no dashboard):
the agents need no CPU of Ray's, only a place to run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from dksm.dedup.owner import ProcessIdentity
from dksm.error import DksmError

HOST_LABEL = "dksm-host"
KEEPER_FILE = "keeper.json"
KEEPER_LOG = "keeper.log"
OBJECT_STORE_BYTES = 80 * 1024 * 1024


class LocalClusterError(DksmError):
    """The local Ray cluster could not be started or stopped."""


def _node_args(host: str) -> dict[str, Any]:
    return {
        "num_cpus": 1,
        "object_store_memory": OBJECT_STORE_BYTES,
        "include_dashboard": False,
        "labels": {HOST_LABEL: host},
    }


def keep(directory: Path, nodes: int) -> int:
    """The keeper's life: start ``nodes`` nodes, publish the address, wait for SIGTERM."""
    stopping = []

    def stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.append(True)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    temp = tempfile.mkdtemp(prefix="dksm-ray-", dir="/tmp")  # short: Ray's socket paths
    os.environ["RAY_TMPDIR"] = temp
    from ray.cluster_utils import Cluster

    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=_node_args("host-0"))
        for n in range(1, nodes):
            cluster.add_node(**_node_args(f"host-{n}"))
        me = ProcessIdentity.current()
        doc = {"address": cluster.address, "pid": me.pid, "start_time": me.start_time,
               "ray_tmpdir": temp}  # fmt: skip
        tmp = directory / (KEEPER_FILE + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, directory / KEEPER_FILE)
        while not stopping:
            time.sleep(0.2)
    finally:
        if cluster is not None:
            cluster.shutdown()  # type: ignore[no-untyped-call]
        shutil.rmtree(temp, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (directory / KEEPER_FILE).unlink()
    return 0


def start(directory: Path, nodes: int, timeout: float = 120.0) -> dict[str, Any]:
    """Start a keeper of ``nodes`` nodes; its record once the cluster is up."""
    if nodes < 1:
        raise LocalClusterError(f"a local cluster needs at least one node, not {nodes}")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / KEEPER_LOG, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dksm", "cluster", "keep", str(directory), str(nodes)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while not (directory / KEEPER_FILE).exists():
        if proc.poll() is not None:
            text = (directory / KEEPER_LOG).read_text(errors="replace").strip().splitlines()
            raise LocalClusterError(
                f"the local Ray cluster did not start: {text[-1] if text else proc.returncode}"
            )
        if time.monotonic() > deadline:
            proc.terminate()
            proc.wait(60)
            raise LocalClusterError(f"the local Ray cluster did not start in {timeout:g} s")
        time.sleep(0.1)
    doc: dict[str, Any] = json.loads((directory / KEEPER_FILE).read_text())
    return doc


def stop(keeper: dict[str, Any], timeout: float = 60.0) -> None:
    """Stop the keeper (its nodes with it), if it is still the process recorded."""
    identity = ProcessIdentity(int(keeper["pid"]), int(keeper["start_time"]))
    if identity.is_alive():
        os.kill(identity.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while identity.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if identity.is_alive():
            os.kill(identity.pid, signal.SIGKILL)  # its nodes' reapers end them
    shutil.rmtree(keeper["ray_tmpdir"], ignore_errors=True)
