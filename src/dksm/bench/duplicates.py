"""Duplicates step by step: one more instance of every image per step, memory after
each step, for each dedup mode (the DKSM thesis's experiment).

The thesis started one more Firecracker process per app at each step, waited 20 s
for KSM, and summed ``smaps_rollup`` over all VMM processes.  Here each step starts
one more small fleet holding one VM of each kind (every VM in a process of its own
by default, Firecracker's shape), in the mode's own pool domain, then samples until
memory has settled (for the KSM modes: after at least three full scans of ksmd since
the step began) or ``step_timeout`` passes, and records the median of the last
``settle_seconds``.

What is counted: Pss_Anon of the processes hosting the VMs, plus the page pool on
tmpfs (:mod:`dksm.memory.accounting`).  Each step's fleet also has a supervisor
process, which the experiment needs and a Firecracker host does not; supervisors are
reported apart (``supervisor_bytes``), not in the figure.
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from dksm.bench.fleet import (
    FINAL_WINDOW_S,
    FleetBenchConfig,
    FleetBenchError,
    HostRecord,
    KsmKnobs,
    apply_host_settings,
    boot_timeout,
    check_pool_emptied,
    mode_domain,
    settled,
    take_sample,
)
from dksm.bench.fleet_report import MODE_STYLE
from dksm.dedup import ksm
from dksm.dedup.pool import PagePool, pool_directory
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec, KsmScope
from dksm.memory.accounting import fleet_memory
from dksm.vmm.config import VmConfig

MIB: Final = 1 << 20
JSON_NAME: Final = "duplicates.json"
PLOT_NAME: Final = "duplicates.png"


@dataclass(frozen=True)
class DuplicatesConfig:
    images: Sequence[str]
    configs: Sequence[str] = ()
    boot_args: str | None = None
    steps: int = 10
    modes: Sequence[DedupMode] = tuple(DedupMode)
    knobs: KsmKnobs = field(default_factory=KsmKnobs)
    mem_mib: int = 16
    vms_per_worker: int = 1
    touch_kib: int = 0
    interval: float = 0.5
    settle_seconds: float = 3.0
    step_timeout: float = 30.0
    ksm_scope: KsmScope = KsmScope.RAM
    thp: str | None = None
    out_dir: Path = Path("out/duplicates")
    pool_root: Path | None = None

    def kinds(self) -> FleetBenchConfig:
        return FleetBenchConfig(
            images=self.images,
            instances=1,
            modes=(),
            mem_mib=self.mem_mib,
            touch_kib=self.touch_kib,
            configs=self.configs,
            boot_args=self.boot_args,
            pool_root=self.pool_root,
        )


@dataclass(frozen=True)
class StepResult:
    instances_per_image: int
    vms: int
    memory_bytes: int  # VM processes' Pss_Anon + pool: median of the last samples
    supervisor_bytes: int  # the steps' supervisors' Pss_Anon, not in memory_bytes
    pool_bytes: int
    pages_sharing: int  # KSM's, host-wide
    pool_pages_saved: int
    settled: bool
    waited_s: float


@dataclass
class ModeSteps:
    mode: str
    steps: list[StepResult] = field(default_factory=list)


def run_duplicates(
    cfg: DuplicatesConfig, *, on_step: Callable[[str, StepResult], None] | None = None
) -> tuple[list[ModeSteps], HostRecord]:
    if cfg.steps < 1:
        raise FleetBenchError(f"--steps must be at least 1, not {cfg.steps}")
    if not ksm.ksm_controllable():
        raise FleetBenchError("the duplicates experiment needs root and KSM (/sys/kernel/mm/ksm)")
    kinds = cfg.kinds().vm_configs()
    results = []
    with ksm.KsmSession() as session:
        host = apply_host_settings(session, cfg.thp)
        for mode in cfg.modes:
            results.append(_run_mode(cfg, mode, kinds, session, on_step))
    return results, host


def _run_mode(
    cfg: DuplicatesConfig,
    mode: DedupMode,
    kinds: Sequence[tuple[str, VmConfig]],
    session: ksm.KsmSession,
    on_step: Callable[[str, StepResult], None] | None,
) -> ModeSteps:
    domain = mode_domain(mode, "duplicates")
    session.apply(**cfg.knobs.settings()) if mode.uses_ksm else session.apply(run=ksm.RUN_STOP)
    specs = [
        (label, InstanceSpec(config, mode, domain, cfg.pool_root, cfg.ksm_scope))
        for label, config in kinds
    ]
    pool_dir = pool_directory(domain, cfg.pool_root) if mode.uses_pool else None
    fleets: list[control.FleetHandle] = []
    pool: PagePool | None = None
    result = ModeSteps(mode.value)
    try:
        for step in range(1, cfg.steps + 1):
            fleet = control.up(
                specs,
                boot_timeout=boot_timeout(len(specs)),
                vms_per_worker=cfg.vms_per_worker,
                hold=True,
            )
            fleets.append(fleet)
            if pool is None and mode.uses_pool:
                pool = PagePool.open(domain, cfg.pool_root)
            result.steps.append(_measure_step(cfg, mode, step, len(specs), fleets, pool_dir, pool))
            if on_step is not None:
                on_step(mode.value, result.steps[-1])
    finally:
        if pool is not None:
            pool.close()
        for fleet in fleets:
            fleet.down()
        alive = [p for f in fleets for p in (m.pid for m in f.members()) if _exists(p)]
        if alive:
            raise FleetBenchError(f"the duplicates experiment left processes behind: {alive}")
        if mode.uses_pool and fleets:
            check_pool_emptied(domain, cfg.pool_root)
    return result


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _measure_step(
    cfg: DuplicatesConfig,
    mode: DedupMode,
    step: int,
    kinds: int,
    fleets: Sequence[control.FleetHandle],
    pool_dir: Path | None,
    pool: PagePool | None,
) -> StepResult:
    started = time.monotonic()
    scans0 = ksm.read_counters()["full_scans"]
    samples = []
    while True:
        now = time.monotonic() - started
        vm_pids = [pid for fleet in fleets for pid in fleet.live_pids()]
        samples.append(take_sample(now, vm_pids, pool_dir, pool))
        done = settled(samples, cfg.settle_seconds, mode.uses_ksm, scans0)
        if done or now >= cfg.step_timeout:
            break
        time.sleep(max(0.0, cfg.interval - (time.monotonic() - started - now)))
    window = sorted(
        s.memory_bytes for s in samples if s.t >= samples[-1].t - min(FINAL_WINDOW_S, now)
    )
    supervisors = [pid for f in fleets if (pid := f.supervisor_pid) is not None]
    return StepResult(
        instances_per_image=step,
        vms=step * kinds,
        memory_bytes=window[len(window) // 2],
        supervisor_bytes=fleet_memory(supervisors).process_bytes,
        pool_bytes=samples[-1].pool_bytes,
        pages_sharing=samples[-1].pages_sharing,
        pool_pages_saved=pool.stats().pages_saved if pool else 0,
        settled=done,
        waited_s=round(now, 2),
    )


def to_json(
    cfg: DuplicatesConfig, results: Sequence[ModeSteps], host: HostRecord
) -> dict[str, object]:
    steps = []
    for index in range(cfg.steps):
        measured = {r.mode: r.steps[index] for r in results if index < len(r.steps)}
        if not measured:
            break
        steps.append(
            {
                "instances_per_image": index + 1,
                "modes": {mode: step.memory_bytes for mode, step in measured.items()},
            }
        )
    return {
        "images": cfg.kinds().labels,
        "mem_mib": cfg.mem_mib,
        "vms_per_process": cfg.vms_per_worker,
        "touch_kib": cfg.touch_kib,
        "ksm": cfg.knobs.describe(),
        "ksm_scope": cfg.ksm_scope.value,
        "measure": "Pss_Anon of the VMs' processes + the page pool on tmpfs (bytes)",
        **host.to_json(),
        "steps": steps,
        "detail": {r.mode: [asdict(s) for s in r.steps] for r in results},
    }


def write_outputs(
    cfg: DuplicatesConfig, results: Sequence[ModeSteps], host: HostRecord
) -> dict[str, object]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    doc = to_json(cfg, results, host)
    (cfg.out_dir / JSON_NAME).write_text(json.dumps(doc, indent=2))
    plot(doc, cfg.out_dir / PLOT_NAME)
    return doc


def plot(doc: dict[str, object], path: Path) -> None:
    """Grouped bars: instances per image on x, one bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps: list[dict[str, object]] = doc["steps"]  # type: ignore[assignment]
    modes = list(dict.fromkeys(m for s in steps for m in s["modes"]))  # type: ignore[attr-defined]
    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=110)
    width = 0.8 / max(1, len(modes))
    for b, mode in enumerate(modes):
        xs = [int(s["instances_per_image"]) - 0.4 + width * (b + 0.5) for s in steps]  # type: ignore[call-overload]
        heights = [s["modes"][mode] / MIB for s in steps]  # type: ignore[index]
        color = MODE_STYLE.get(mode, ("black", "", "", 0.0))[0]
        ax.bar(xs, heights, width, label=mode, color=color)
    images: list[str] = doc["images"]  # type: ignore[assignment]
    ax.set_xticks([int(s["instances_per_image"]) for s in steps])  # type: ignore[call-overload]
    ax.set_xlabel(textwrap.fill(f"instances of each image ({', '.join(images)})", 110))
    ax.set_ylabel("MiB: Pss_Anon of the VMs'\nprocesses + the page pool")
    ax.set_title(
        f"memory after each step ({doc['vms_per_process']} VM(s) per process, KSM {doc['ksm']},"
        f" THP {doc['thp_enabled']})",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(doc: dict[str, object]) -> object:
    from rich.table import Table

    steps: list[dict[str, dict[str, int]]] = doc["steps"]  # type: ignore[assignment]
    modes = list(dict.fromkeys(m for s in steps for m in s["modes"]))
    t = Table(title="memory after each step (MiB)")
    t.add_column("instances per image", justify="right")
    for mode in modes:
        t.add_column(mode, justify="right")
    for s in steps:
        t.add_row(
            str(s["instances_per_image"]),
            *(f"{s['modes'][m] / MIB:.1f}" if m in s["modes"] else "" for m in modes),
        )
    return t
