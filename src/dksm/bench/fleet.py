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

``from_launch`` measures the DKSM thesis's way instead: time 0 is the moment the first
VM starts, so booting is on the curve, and every mode is sampled for the whole
``duration`` (the thesis: every second for 60 s).  The fleet is then started from a
thread while this one samples it.  ``thp`` sets transparent huge pages for the run
(the thesis: ``never``); the setting found is recorded in the results either way and
put back with KSM's settings, on every exit.

The fleet is started holding its VMs: a guest that shuts down (a run-to-completion
unikernel, such as the real Unikraft apps) stays mapped as it was at its end until
the mode is over, so every mode measures the same standing fleet.  The kit's own
guests never shut down here (they are told ``then=idle``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dksm.dedup import huge_pages, ksm
from dksm.dedup.pool import PagePool, pool_directory
from dksm.error import DksmError
from dksm.fleet import control
from dksm.fleet.directory import FleetDirectory
from dksm.fleet.instance import DedupMode, InstanceSpec, KsmScope
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
    t: float  # seconds since every VM booted (from launch: since the first VM started)
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
    booted_t: float = 0.0  # when every VM had booted, on the samples' time axis

    @property
    def memory_at_boot(self) -> int:
        """The first sample once every VM had booted."""
        booted = [s for s in self.samples if s.t >= self.booted_t]
        return (booted or self.samples[-1:])[0].memory_bytes

    @property
    def final_memory(self) -> int:
        """The median of the last ``FINAL_WINDOW_S`` seconds: one sample alone would
        carry the jitter of a few allocator pages."""
        last = self.samples[-1].t
        window = sorted(s.memory_bytes for s in self.samples if s.t >= last - FINAL_WINDOW_S)
        return window[len(window) // 2]

    @property
    def converge_seconds(self) -> float:
        """From the samples' time origin until memory stays within 1% of its final value."""
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
            "booted_at_t": self.booted_t,
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
    from_launch: bool = False  # time 0 at the first VM's start; every mode sampled `duration`
    thp: str | None = None  # transparent huge pages for the run ("never"); None: as found
    ksm_scope: KsmScope = KsmScope.RAM

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


def settled(samples: list[Sample], settle: float, needs_scans: bool, scans0: int) -> bool:
    if not samples or samples[-1].t < settle:
        return False
    if needs_scans and samples[-1].full_scans - scans0 < KSM_MIN_FULL_SCANS:
        return False
    window = [s.memory_bytes for s in samples if s.t >= samples[-1].t - settle]
    return max(window) - min(window) <= CONVERGED_WITHIN * max(window)


def take_sample(
    t: float, pids: Sequence[int], pool_dir: Path | None, pool: PagePool | None
) -> Sample:
    """The fleet's memory, KSM's counters and both mergers' CPU time, now."""
    counters = ksm.read_counters()
    memory = fleet_memory(pids, [pool_dir] if pool_dir is not None else [])
    return Sample(
        t=round(t, 3),
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


def mode_domain(mode: DedupMode, purpose: str = "bench") -> str:
    """A pool domain of this run's own, so that no mode starts warm."""
    return f"{purpose}-{mode.value.replace('+', '-')}-{os.getpid()}"


def _run_mode(
    cfg: FleetBenchConfig,
    mode: DedupMode,
    session: ksm.KsmSession,
    tick: Callable[[str, float], None],
) -> ModeResult:
    domain = mode_domain(mode)
    session.apply(**cfg.knobs.settings()) if mode.uses_ksm else session.apply(run=ksm.RUN_STOP)
    specs = [
        (label, InstanceSpec(config, mode, domain, cfg.pool_root, cfg.ksm_scope))
        for label, config in cfg.vm_configs()
        for _ in range(cfg.instances)
    ]
    if cfg.from_launch:
        return _run_mode_from_launch(cfg, mode, domain, specs, tick)
    started = time.monotonic()
    handle = control.up(
        specs,
        boot_timeout=boot_timeout(len(specs)),
        vms_per_worker=cfg.vms_per_worker,
        hold=True,
    )
    booted = time.monotonic()
    result = ModeResult(mode.value, len(specs), booted - started)
    pool_dir = pool_directory(domain, cfg.pool_root) if mode.uses_pool else None
    # One handle for the whole mode: opening the pool sweeps it, not a per-sample job.
    pool = PagePool.open(domain, cfg.pool_root) if mode.uses_pool else None
    try:
        scans0 = ksm.read_counters()["full_scans"]
        while True:
            now = time.monotonic() - booted
            result.samples.append(take_sample(now, handle.process_pids(), pool_dir, pool))
            tick(mode.value, now)
            if now >= cfg.duration or settled(
                result.samples, cfg.settle_seconds, mode.uses_ksm, scans0
            ):
                break
            time.sleep(max(0.0, cfg.interval - (time.monotonic() - booted - now)))
        _count_pool(result, pool)
    finally:
        if pool is not None:
            pool.close()  # before the check below, which purges the pool
        final = handle.down()
        result.failed_vms = sum(m.state == "failed" for m in final.members)
        check_nothing_left(handle, domain, cfg.pool_root, mode)
    return result


def boot_timeout(vms: int) -> float:
    return max(120.0, 2.0 * vms)


def _count_pool(result: ModeResult, pool: PagePool | None) -> None:
    if pool is not None:
        stats = pool.stats()
        result.pool_pages_saved = stats.pages_saved
        result.pool_hashtable_entries = stats.hashtable_entries


class _Launch:
    """``control.up`` on a thread of its own, so that the caller can sample the fleet
    while it boots; the fleet's directory is recognised by its (unique) pool domain."""

    def __init__(
        self, specs: Sequence[tuple[str, InstanceSpec]], vms_per_worker: int, domain: str
    ) -> None:
        self.root = control.runtime_root()
        self.known = set(self.root.glob("*")) if self.root.is_dir() else set()
        self.domain = domain
        self.handle: control.FleetHandle | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._directory: Path | None = None
        self._thread = threading.Thread(
            target=self._up, args=(specs, vms_per_worker), name="fleet-launch", daemon=True
        )
        self._thread.start()

    def _up(self, specs: Sequence[tuple[str, InstanceSpec]], vms_per_worker: int) -> None:
        try:
            self.handle = control.up(
                specs, boot_timeout=boot_timeout(len(specs)), vms_per_worker=vms_per_worker,
                hold=True, root=self.root,
            )  # fmt: skip
        except BaseException as error:  # reported by the sampling thread
            self.error = error
        finally:
            self.done.set()

    def fleet(self) -> control.FleetHandle | None:
        """The fleet, as soon as its directory exists (before it has booted)."""
        if self.handle is not None:
            return self.handle
        if self._directory is None:
            for directory in set(self.root.glob("*")) - self.known:
                try:
                    spec = FleetDirectory(directory).read_spec()
                except (OSError, ValueError):
                    continue
                if spec["members"][0]["domain"] == self.domain:
                    self._directory = directory
        return None if self._directory is None else control.FleetHandle(self._directory)

    def first_vm_started(self) -> float | None:
        """Wall-clock time the first VM's process was forked (the supervisor's record)."""
        fleet = self.fleet()
        starts = [m.started_at for m in fleet.state().members] if fleet else []
        return min(starts) if starts else None

    def stop(self) -> control.FleetHandle | None:
        """Wait for ``control.up`` to return, stop the fleet if one was found; the
        handle of the stopped fleet."""
        fleet = self.fleet()
        if fleet is not None and not self.done.is_set():
            fleet.down()  # an interrupted launch: its wait for boot then ends too
        while not self.done.wait(0.1):
            pass
        fleet = self.handle or self.fleet()
        if fleet is not None:
            fleet.down()
        return fleet


def _run_mode_from_launch(
    cfg: FleetBenchConfig,
    mode: DedupMode,
    domain: str,
    specs: Sequence[tuple[str, InstanceSpec]],
    tick: Callable[[str, float], None],
) -> ModeResult:
    pool_dir = pool_directory(domain, cfg.pool_root) if mode.uses_pool else None
    result = ModeResult(mode.value, len(specs), 0.0)
    launched_wall, launched = time.time(), time.monotonic()
    launch = _Launch(specs, cfg.vms_per_worker, domain)
    walls: list[float] = []
    pool: PagePool | None = None
    fleet: control.FleetHandle | None = None
    try:
        while True:
            now = time.monotonic() - launched
            if launch.error is not None:
                raise launch.error
            if launch.done.is_set() and not result.boot_seconds:
                result.boot_seconds = now
            fleet = launch.fleet()
            if pool is None and mode.uses_pool and fleet is not None:
                pool = PagePool.open(domain, cfg.pool_root)  # (creating it is safe to race)
            if fleet is not None:
                walls.append(time.time())
                result.samples.append(take_sample(now, fleet.process_pids(), pool_dir, pool))
            tick(mode.value, now)
            if now >= cfg.duration:
                break
            time.sleep(max(0.0, cfg.interval - (time.monotonic() - launched - now)))
        if not launch.done.is_set():
            raise FleetBenchError(f"the fleet had not booted after {cfg.duration:g} s")
        _count_pool(result, pool)
        # Time 0 is the first VM's start: the samples before it (the supervisor
        # preparing) are dropped, the rest shifted onto that origin.
        origin = launch.first_vm_started() or launched_wall
        result.booted_t = round(launched_wall + result.boot_seconds - origin, 3)
        result.samples = [
            replace(sample, t=round(wall - origin, 3))
            for sample, wall in zip(result.samples, walls, strict=True)
            if wall >= origin
        ]
        if not result.samples:
            raise FleetBenchError("no sample was taken after the first VM started")
    except BaseException:
        if pool is not None:
            pool.close()
        launch.stop()
        if mode.uses_pool:  # an interrupted run leaves no pool of its own behind
            check_pool_emptied(domain, cfg.pool_root)
        raise
    if pool is not None:
        pool.close()
    fleet = launch.stop()
    if fleet is not None:
        result.failed_vms = sum(m.state == "failed" for m in fleet.state().members)
        check_nothing_left(fleet, domain, cfg.pool_root, mode)
    return result


def check_nothing_left(
    handle: control.FleetHandle, domain: str, root: Path | None, mode: DedupMode
) -> None:
    alive = [pid for pid in (m.pid for m in handle.members()) if os.path.exists(f"/proc/{pid}")]
    if alive:
        raise FleetBenchError(f"fleet {handle.id} left processes behind: {alive}")
    if mode.uses_pool:
        check_pool_emptied(domain, root)


def check_pool_emptied(domain: str, root: Path | None) -> None:
    """Check that every VM of a domain released its pages, then remove its pool."""
    with contextlib.closing(PagePool.open(domain, root)) as pool:
        stats = pool.stats()
        if stats.leases or stats.hashtable_entries or stats.file_blocks_bytes:
            raise FleetBenchError(
                f"pool domain {domain} not empty after its VMs ended: {stats.to_json()}"
            )
        pool.purge()


@dataclass(frozen=True)
class HostRecord:
    """Host settings that shape memory results, as they were during the run."""

    thp_enabled: str  # transparent huge pages during the run
    thp_enabled_found: str  # ... and before it (the run may have switched them off)
    # The host's load when the run began (1, 5, 15 min): other work competes for the
    # CPUs and shows in every timing, so results say how busy the machine was.
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def now(cls) -> HostRecord:
        found = huge_pages.read_thp_enabled()
        return cls(found, found, os.getloadavg())

    def to_json(self) -> dict[str, object]:
        return {
            "thp_enabled": self.thp_enabled,
            "thp_enabled_found": self.thp_enabled_found,
            "load_average_at_start": [round(x, 2) for x in self.load_average],
        }


def apply_host_settings(session: ksm.KsmSession, thp: str | None) -> HostRecord:
    """Set transparent huge pages for the run if asked (restored with KSM's settings)."""
    found = huge_pages.read_thp_enabled()
    if thp is not None and thp != found:
        session.set_thp_enabled(thp)
    return HostRecord(huge_pages.read_thp_enabled(), found, os.getloadavg())


def run_fleet_bench(
    cfg: FleetBenchConfig, *, show_progress: bool = True
) -> tuple[list[ModeResult], HostRecord]:
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
        host = apply_host_settings(session, cfg.thp)
        for mode in cfg.modes:
            task = progress.add_task(f"{mode.value}: starting fleet", total=cfg.duration)

            def tick(name: str, t: float, task: TaskID = task) -> None:
                progress.update(task, completed=t, description=f"{name}: sampling")

            results.append(_run_mode(cfg, mode, session, tick))
            progress.update(task, completed=cfg.duration, description=f"{mode.value}: done")
    return results, host
