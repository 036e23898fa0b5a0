"""Density: what one more microVM costs the host, measured end to end.

For each fleet size N: start N idle VMs of one image under ``dksm``, let them
settle, and measure

- ``fleet_bytes``: the fleet's memory (sum of Pss_Anon + Pss_File over the
  supervisor and every worker, plus the pool's tmpfs bytes; see
  :mod:`dksm.memory.accounting`);
- ``guest_bytes``: what the guests themselves hold, per VM: the Pss of the mappings
  inside each guest's RAM range (its touched anonymous pages, and its share of the
  pool pages it touched), plus the pool pages nobody touched, spread over the VMs;
- ``per_vm_overhead_bytes`` = fleet_bytes / N - guest_bytes: the monitor's cost;
- the drop of the host's ``MemAvailable`` per VM, which also sees kernel-side memory
  (KVM structures, page tables) that no Pss shows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from dksm.dedup.pool import PagePool, pool_directory
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.guests import resolve_image
from dksm.memory.accounting import fleet_memory, process_mappings, tmpfs_bytes
from dksm.vmm.config import DEFAULT_BOOT_ARGS, VmConfig

SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class DensityRow:
    instances: int
    vms_per_process: int
    processes: int
    fleet_bytes: int
    guest_bytes: int
    per_vm_overhead_bytes: int
    fleet_bytes_per_vm: int
    mem_available_drop_per_vm_bytes: int
    boot_seconds: float


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def measure(
    image: str, instances: int, vms_per_process: int, mem_mib: int, domain: str
) -> DensityRow:
    path = resolve_image(image)
    config = VmConfig(
        kernel_path=str(path), mem_mib=mem_mib, boot_args=f"{DEFAULT_BOOT_ARGS} then=idle"
    )
    spec = InstanceSpec(config, DedupMode.DKSM, domain)
    before = _mem_available()
    start = time.monotonic()
    handle = control.up(
        [(path.stem, spec)] * instances,
        boot_timeout=max(120.0, instances * 0.5),
        vms_per_worker=vms_per_process,
    )
    boot_seconds = time.monotonic() - start
    try:
        time.sleep(SETTLE_SECONDS)
        pool_dir = pool_directory(domain)
        memory = fleet_memory(handle.process_pids(), [pool_dir])
        after = _mem_available()
        # Each process's smaps is read once, however many VMs it hosts.
        pages_file = str(pool_dir / "pages")
        maps = {pid: process_mappings(pid) for pid in handle.live_pids()}
        guest_total = 0
        for member in handle.members():
            info = handle.info(member.index)
            ram, size = info.ram_host_address, info.mem_size
            guest_total += sum(m.pss for m in maps[info.pid] if m.within(ram, size))
        # Pool pages no guest touched are in no Pss; they are still the guests'.
        touched_pool = sum(m.pss for ms in maps.values() for m in ms if m.path == pages_file)
        guest_total += max(0, tmpfs_bytes(pool_dir / "pages") - touched_pool)
    finally:
        handle.down()
    guest_bytes = guest_total // instances
    per_vm = memory.total // instances
    return DensityRow(
        instances=instances,
        vms_per_process=vms_per_process,
        processes=memory.processes,
        fleet_bytes=memory.total,
        guest_bytes=guest_bytes,
        per_vm_overhead_bytes=per_vm - guest_bytes,
        fleet_bytes_per_vm=per_vm,
        mem_available_drop_per_vm_bytes=(before - after) // instances,
        boot_seconds=round(boot_seconds, 2),
    )


def run_density(
    image: str, sizes: Sequence[int], vms_per_process: Sequence[int], mem_mib: int = 16
) -> list[DensityRow]:
    rows = []
    for per_process in vms_per_process:
        for n in sizes:
            domain = f"density-{n}-{per_process}"
            rows.append(measure(image, n, per_process, mem_mib, domain))
            with contextlib.closing(PagePool.open(domain)) as pool:
                pool.purge()
    return rows


def to_json(rows: Sequence[DensityRow]) -> dict[str, object]:
    return {"rows": [asdict(r) for r in rows]}


def table(rows: Sequence[DensityRow]) -> object:
    from rich.table import Table

    kib = 1024
    t = Table(title="per-VM cost of idle microVMs under dksm")
    for col in (
        "VMs",
        "VMs/process",
        "fleet MiB",
        "fleet KiB/VM",
        "guest KiB/VM",
        "overhead KiB/VM",
        "MemAvailable drop KiB/VM",
        "boot s",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r.instances),
            str(r.vms_per_process),
            f"{r.fleet_bytes / kib / kib:.1f}",
            f"{r.fleet_bytes_per_vm / kib:.0f}",
            f"{r.guest_bytes / kib:.0f}",
            f"{r.per_vm_overhead_bytes / kib:.0f}",
            f"{r.mem_available_drop_per_vm_bytes / kib:.0f}",
            f"{r.boot_seconds:.1f}",
        )
    return t
