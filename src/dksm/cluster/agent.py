"""The host agent: one Ray actor per node, pinned to it, owning that host's pool
domain and fleets.

It starts the VMs placement sends it as a dksm fleet (the fleet's supervisor dies
with the agent, so a lost agent takes its VMs and their pool references with it),
reports which pages of each image its pool already holds, its fleets' memory and
what its pool saves, and on ``teardown`` stops its fleets and removes its pool and
records, leaving nothing behind on the host.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from dksm.dedup.pool import PagePool, PoolMissingError, pool_directory
from dksm.fleet import control
from dksm.fleet.directory import LIVE_STATES
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.memory.accounting import fleet_memory
from dksm.vmm.config import VmConfig


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class HostAgent:
    """Made a Ray actor by :func:`dksm.cluster.control.agent_class`."""

    def __init__(self, host: str, pool_root: str | None, run_dir: str, domain: str) -> None:
        self.host = host
        self.domain = domain
        self.pool_root = None if pool_root is None else Path(pool_root)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.pool_root is not None:
            self.pool_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def pid(self) -> int:
        return os.getpid()

    def _pool_keys(self) -> frozenset[bytes]:
        try:
            with contextlib.closing(
                PagePool.open(self.domain, self.pool_root, create=False)
            ) as pool:
                return pool.held_keys()
        except PoolMissingError:
            return frozenset()

    def _pool_stats(self) -> dict[str, int]:
        try:
            with contextlib.closing(
                PagePool.open(self.domain, self.pool_root, create=False)
            ) as pool:
                stats = pool.stats()
        except PoolMissingError:
            return {"pool_pages": 0, "saved_bytes": 0}
        return {"pool_pages": stats.hashtable_entries, "saved_bytes": stats.bytes_saved}

    def report(self, images: dict[str, list[bytes]]) -> dict[str, Any]:
        """Per image (label -> its page keys), the keys this host's pool holds; the
        host's VMs, its fleets' memory, what its pool saves, and MemAvailable."""
        held = self._pool_keys()
        vms: list[dict[str, Any]] = []
        pids: list[int] = []
        for handle in control.all_fleets(self.run_dir):
            pids += handle.process_pids()
            for member in handle.members():
                vms.append(
                    {
                        "fleet": handle.id,
                        "index": member.index,
                        "label": member.label,
                        "state": member.state,
                        "pid": member.pid,
                    }
                )
        directory = pool_directory(self.domain, self.pool_root)
        memory = fleet_memory(pids, [directory] if directory.is_dir() else [])
        return {
            "host": self.host,
            "pid": os.getpid(),
            "held": {label: [k for k in keys if k in held] for label, keys in images.items()},
            "vms": vms,
            "live_vms": sum(1 for vm in vms if vm["state"] in LIVE_STATES),
            "memory_bytes": memory.total,
            "mem_available": _mem_available(),
            **self._pool_stats(),
        }

    def start(self, vms: list[dict[str, Any]], boot_timeout: float) -> str:
        """Start ``vms`` (each: image path, label, boot_args, mem_mib) as one fleet;
        its id."""
        specs = [
            (
                vm["label"],
                InstanceSpec(
                    VmConfig(vm["image"], vm["boot_args"], int(vm["mem_mib"])),
                    DedupMode.DKSM,
                    self.domain,
                    self.pool_root,
                ),
            )
            for vm in vms
        ]
        handle = control.up(
            specs, boot_timeout=boot_timeout, root=self.run_dir, die_with_caller=True
        )
        return handle.id

    def teardown(self) -> list[str]:
        """Stop every fleet, remove the pool and the records; what was left behind."""
        for handle in control.all_fleets(self.run_dir):
            handle.down()
        left: list[str] = []
        try:
            with contextlib.closing(
                PagePool.open(self.domain, self.pool_root, create=False)
            ) as pool:
                left += pool.purge()
        except PoolMissingError:
            pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.pool_root is not None:
            with contextlib.suppress(OSError):
                self.pool_root.rmdir()  # only if empty: names dksm did not make stay
            if self.pool_root.exists():
                left.append(str(self.pool_root))
        return left
