"""The fleet experiment: the same fleet of idle microVMs under each dedup mode in
turn, memory sampled over time, KSM and dksm side by side in one run.

Per mode: KSM is switched on (ksm modes) or off (the others) inside one saved and
restored KSM session; the fleet is started through the same supervisor ``dksm
fleet up`` uses; every ``interval`` seconds the fleet's memory (see
:mod:`dksm.memory.accounting`), KSM's counters, ksmd's CPU time and the pool's own
merge CPU time are sampled, until memory has settled or ``duration`` ends; then the
fleet is stopped and checked to have left nothing behind (no live member, no lease,
an empty pool).  Each mode gets its own pool domain, so no mode starts warm.

Convergence is the time from the moment every VM has booted until memory stays
within 1% of its final value.

The fleet is started holding its VMs: a guest that shuts down (a run-to-completion
unikernel, such as the real Unikraft apps) stays mapped as it was at its end until
the mode is over, so every mode measures the same standing fleet.  The kit's own
guests never shut down here (they are told ``then=idle``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dksm.dedup import ksm
from dksm.dedup.pool import PagePool, pool_directory
from dksm.error import DksmError
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.fleet.launcher import DEFAULT_VMS_PER_WORKER
from dksm.memory.accounting import fleet_memory
from dksm.vmm.config import DEFAULT_BOOT_ARGS, VmConfig

MIB = 1 << 20
CONVERGED_WITHIN = 0.01
FINAL_WINDOW_S = 2.0
# A KSM mode is not judged settled before ksmd finished this many full scans since
# the fleet booted: a page needs two scans to merge.
KSM_MIN_FULL_SCANS = 3
# Apps that finish their work stay up, halted, with "then=idle" (guests/README.md).
FLEET_BOOT_ARGS = f"{DEFAULT_BOOT_ARGS} then=idle"


class FleetBenchError(DksmError):
    """The fleet experiment could not run, or a fleet left something behind."""


@dataclass(frozen=True)
class KsmKnobs:
    """How KSM scans in the ksm modes: explicit rates, or the kernel's advisor."""

    pages_to_scan: int | None = None  # None: the kernel's default (100)
    sleep_millisecs: int | None = None  # None: the kernel's default (20)
    advisor: bool = False

    def settings(self) -> dict[str, int | str]:
        if self.advisor:
            return {"advisor_mode": "scan-time", "run": ksm.RUN_MERGE}
        values: dict[str, int | str] = {
            "advisor_mode": "none",
            "pages_to_scan": 100 if self.pages_to_scan is None else self.pages_to_scan,
            "sleep_millisecs": 20 if self.sleep_millisecs is None else self.sleep_millisecs,
        }
        values["run"] = ksm.RUN_MERGE
        return values

    def describe(self) -> str:
        if self.advisor:
            return "advisor (scan-time)"
        return f"{self.settings()['pages_to_scan']} pages / {self.settings()['sleep_millisecs']} ms"


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since every VM booted
    memory_bytes: int
    process_bytes: int
    pool_bytes: int
    processes: int
    pages_sharing: int
    pages_shared: int
    full_scans: int
    ksmd_cpu_s: float
    dksm_cpu_s: float


@dataclass
class ModeResult:
    mode: str
    instances: int
    boot_seconds: float
    samples: list[Sample] = field(default_factory=list)
    failed_vms: int = 0
    pool_pages_saved: int = 0  # references - distinct pages, while the fleet ran
    pool_hashtable_entries: int = 0

    @property
    def memory_at_boot(self) -> int:
        return self.samples[0].memory_bytes

    @property
    def final_memory(self) -> int:
        """The median of the last ``FINAL_WINDOW_S`` seconds: one sample alone would
        carry the jitter of a few allocator pages."""
        last = self.samples[-1].t
        window = sorted(s.memory_bytes for s in self.samples if s.t >= last - FINAL_WINDOW_S)
        return window[len(window) // 2]

    @property
    def converge_seconds(self) -> float:
        final = self.final_memory
        converged_at = self.samples[-1].t
        for sample in reversed(self.samples):
            if abs(sample.memory_bytes - final) > CONVERGED_WITHIN * final:
                break
            converged_at = sample.t
        return converged_at

    @property
    def dedup_cpu_seconds(self) -> float:
        last, first = self.samples[-1], self.samples[0]
        ksmd = last.ksmd_cpu_s - first.ksmd_cpu_s if self.mode in ("ksm", "dksm+ksm") else 0.0
        return ksmd + last.dksm_cpu_s

    def summary(self) -> dict[str, object]:
        return {
            "instances": self.instances,
            "memory_at_boot_bytes": self.memory_at_boot,
            "final_memory_bytes": self.final_memory,
            "converge_seconds": round(self.converge_seconds, 2),
            "dedup_cpu_seconds": round(self.dedup_cpu_seconds, 4),
            "boot_seconds": round(self.boot_seconds, 2),
            "failed_vms": self.failed_vms,
            "samples": len(self.samples),
            "final_pages_sharing": self.samples[-1].pages_sharing,
            "pool_pages_saved": self.pool_pages_saved,
            "pool_hashtable_entries": self.pool_hashtable_entries,
        }


@dataclass(frozen=True)
class FleetBenchConfig:
    images: Sequence[str]  # shipped guest names or image paths
    instances: int
    modes: Sequence[DedupMode]
    duration: float = 60.0
    mem_mib: int = 16
    knobs: KsmKnobs = KsmKnobs()
    out_dir: Path = Path("out/fleet")
    interval: float = 0.5
    settle_seconds: float = 5.0
    pool_root: Path | None = None
    vms_per_worker: int = DEFAULT_VMS_PER_WORKER
    touch_kib: int = 0  # guest memory each VM fills with unique pages (guests/README.md)
    configs: Sequence[str] = ()  # Firecracker config files, each one more kind of VM
    boot_args: str | None = None  # for images that are not shipped guests

    def vm_configs(self) -> list[tuple[str, VmConfig]]:
        """(label, config) of each kind of VM in the fleet."""
        from dksm.guests import IMAGES_DIR, resolve_image
        from dksm.vmm.config import FLEET_REFUSED_SECTIONS, from_firecracker_json

        kinds: list[tuple[str, VmConfig]] = []
        for image in self.images:
            path = resolve_image(image)
            if path.parent == Path(IMAGES_DIR):  # a kit guest: it idles and can touch RAM
                args = FLEET_BOOT_ARGS + (f" touch={self.touch_kib}" if self.touch_kib else "")
            else:
                args = DEFAULT_BOOT_ARGS if self.boot_args is None else self.boot_args
            kinds.append((path.stem, VmConfig(str(path), boot_args=args, mem_mib=self.mem_mib)))
        for config_file in self.configs:
            config = from_firecracker_json(config_file, refuse=FLEET_REFUSED_SECTIONS).vm
            kinds.append((Path(config.kernel_path).stem, config))
        return kinds

    @property
    def labels(self) -> list[str]:
        return [label for label, _ in self.vm_configs()]


def _settled(samples: list[Sample], settle: float, needs_scans: bool, scans0: int) -> bool:
    if not samples or samples[-1].t < settle:
        return False
    if needs_scans and samples[-1].full_scans - scans0 < KSM_MIN_FULL_SCANS:
        return False
    window = [s.memory_bytes for s in samples if s.t >= samples[-1].t - settle]
    return max(window) - min(window) <= CONVERGED_WITHIN * max(window)


def _run_mode(
    cfg: FleetBenchConfig,
    mode: DedupMode,
    session: ksm.KsmSession,
    tick: Callable[[str, float], None],
) -> ModeResult:
    domain = f"bench-{mode.value.replace('+', '-')}-{os.getpid()}"
    session.apply(**cfg.knobs.settings()) if mode.uses_ksm else session.apply(run=ksm.RUN_STOP)
    specs = [
        (label, InstanceSpec(config, mode, domain, cfg.pool_root))
        for label, config in cfg.vm_configs()
        for _ in range(cfg.instances)
    ]
    started = time.monotonic()
    handle = control.up(
        specs,
        boot_timeout=max(120.0, 2.0 * len(specs)),
        vms_per_worker=cfg.vms_per_worker,
        hold=True,
    )
    booted = time.monotonic()
    result = ModeResult(mode.value, len(specs), booted - started)
    pool_dir = pool_directory(domain, cfg.pool_root)
    # One handle for the whole mode: opening the pool sweeps it, not a per-sample job.
    pool = PagePool.open(domain, cfg.pool_root) if mode.uses_pool else None
    try:
        scans0 = ksm.read_counters()["full_scans"]
        while True:
            now = time.monotonic() - booted
            counters = ksm.read_counters()
            memory = fleet_memory(handle.process_pids(), [pool_dir] if mode.uses_pool else [])
            result.samples.append(
                Sample(
                    t=round(now, 3),
                    memory_bytes=memory.total,
                    process_bytes=memory.process_bytes,
                    pool_bytes=memory.pool_bytes,
                    processes=memory.processes,
                    pages_sharing=counters["pages_sharing"],
                    pages_shared=counters["pages_shared"],
                    full_scans=counters["full_scans"],
                    ksmd_cpu_s=ksm.ksmd_cpu_seconds(),
                    dksm_cpu_s=pool.stats().merge_cpu_ns / 1e9 if pool else 0.0,
                )
            )
            tick(mode.value, now)
            if now >= cfg.duration or _settled(
                result.samples, cfg.settle_seconds, mode.uses_ksm, scans0
            ):
                break
            time.sleep(max(0.0, cfg.interval - (time.monotonic() - booted - now)))
        if pool is not None:
            stats = pool.stats()
            result.pool_pages_saved = stats.pages_saved
            result.pool_hashtable_entries = stats.hashtable_entries
    finally:
        if pool is not None:
            pool.close()  # before the check below, which purges the pool
        final = handle.down()
        result.failed_vms = sum(m["state"] == "failed" for m in final.get("members", []))
        _check_nothing_left(handle, domain, cfg.pool_root, mode)
    return result


def _check_nothing_left(
    handle: control.FleetHandle, domain: str, root: Path | None, mode: DedupMode
) -> None:
    alive = [pid for pid in (m["pid"] for m in handle.members()) if os.path.exists(f"/proc/{pid}")]
    if alive:
        raise FleetBenchError(f"fleet {handle.id} left processes behind: {alive}")
    if not mode.uses_pool:
        return
    with contextlib.closing(PagePool.open(domain, root)) as pool:
        stats = pool.stats()
        if stats.leases or stats.hashtable_entries or stats.file_blocks_bytes:
            raise FleetBenchError(
                f"pool domain {domain} not empty after the fleet ended: {stats.to_json()}"
            )
        pool.purge()


def write_outputs(cfg: FleetBenchConfig, results: list[ModeResult]) -> dict[str, object]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for result in results:
        with open(
            cfg.out_dir / f"memory-{result.mode.replace('+', '-')}.csv", "w", newline=""
        ) as f:
            writer = csv.DictWriter(f, fieldnames=list(Sample.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(asdict(s) for s in result.samples)
    summary: dict[str, object] = {
        "images": cfg.labels,
        "instances_per_image": cfg.instances,
        "mem_mib": cfg.mem_mib,
        "ksm": cfg.knobs.describe(),
        "touch_kib": cfg.touch_kib,
        "modes": {r.mode: r.summary() for r in results},
    }
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(results, cfg, cfg.out_dir / "memory.png")
    return summary


def plot(results: list[ModeResult], cfg: FleetBenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in results:
        ax.plot(
            [s.t for s in r.samples],
            [s.memory_bytes / MIB for s in r.samples],
            label=r.mode,
            linewidth=2,
        )
    labels = cfg.labels
    total = len(labels) * cfg.instances
    touched = f", {cfg.touch_kib // 1024} MiB touched each" if cfg.touch_kib else ""
    ax.set_title(
        f"{total} microVMs ({', '.join(labels)}{touched}), KSM {cfg.knobs.describe()}",
        fontsize=10,
    )
    ax.set_xlabel("seconds since every VM booted")
    ax.set_ylabel("fleet memory (MiB: sum of Pss_Anon + pool)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: list[ModeResult]) -> object:
    from rich.table import Table

    t = Table(title="fleet memory by dedup mode")
    for col in (
        "mode",
        "VMs",
        "at boot (MiB)",
        "final (MiB)",
        "converged after (s)",
        "dedup CPU (s)",
    ):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(
            r.mode,
            str(r.instances),
            f"{r.memory_at_boot / MIB:.1f}",
            f"{r.final_memory / MIB:.1f}",
            f"{r.converge_seconds:.1f}",
            f"{r.dedup_cpu_seconds:.3f}",
        )
    return t


def run_fleet_bench(cfg: FleetBenchConfig, *, show_progress: bool = True) -> list[ModeResult]:
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    if not ksm.ksm_controllable():
        raise FleetBenchError("the fleet experiment needs root and KSM (/sys/kernel/mm/ksm)")
    results: list[ModeResult] = []
    with (
        ksm.KsmSession() as session,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            disable=not show_progress,
            transient=True,
        ) as progress,
    ):
        for mode in cfg.modes:
            task = progress.add_task(f"{mode.value}: starting fleet", total=cfg.duration)

            def tick(name: str, t: float, task: TaskID = task) -> None:
                progress.update(task, completed=t, description=f"{name}: sampling")

            results.append(_run_mode(cfg, mode, session, tick))
            progress.update(task, completed=cfg.duration, description=f"{mode.value}: done")
    return results
