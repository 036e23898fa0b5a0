"""The run-time experiment: does a scanning daemon slow a running guest down?

The DKSM thesis's third claim is that long-lived unikernels run better without ksmd
competing for the CPU.  Its measurement, reproduced here: a compute-bound guest is
run N times while a background fleet of other microVMs runs, for each dedup mode and
each placement, and each run's VMM process is measured.

For each *row* (mode x placement x KSM setting):

1. KSM is set for the row (``default`` or ``aggressive`` in the KSM modes, stopped
   in the others) and ksmd is pinned to the background's CPU; both are host-wide and
   restored by the :class:`~dksm.dedup.ksm.KsmSession` the experiment runs in.
2. The background fleet starts, in the row's mode and a pool domain of the row's own,
   on the background CPU (the fleet's processes and vCPU threads inherit the CPU
   affinity of the thread that starts them), and is left ``settle`` seconds.
3. The measured guest runs ``runs`` times, each in a fresh VMM process
   (:mod:`dksm.bench.guest_run`) in the same mode and domain, on the measured CPU.

Placements: ``same-core`` puts the measured VM, the fleet and ksmd on one CPU (the
thesis's ``same_core``: the background and the measured VMM pinned to one core);
``other-core`` gives the measured VM a CPU of its own (the thesis's
``different_cores``); ``alone`` runs it with no background fleet at all.

Per run: the guest's run time (first instruction to shutdown, timed inside the VMM),
the process's elapsed time (as ``perf stat`` reports it), and from ``wait4`` its
minor and major page faults, voluntary and involuntary context switches, and user and
system time; ksmd's CPU time over the run; and hardware counters through ``perf
stat`` where the machine has them (:mod:`dksm.bench.perf_counters` says plainly when
it has not).  Per row: median and spread (standard deviation, min, max) of each.

Guest kernel-mode code is emulated on PVM hosts (about 1 us per instruction), so
the guest's work is in the host kernel, on the vCPU thread: it is system time of the
VMM process, and it competes for its CPU exactly as a guest on hardware KVM would.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from dksm.bench import perf_counters
from dksm.bench.fleet import (
    FleetBenchConfig,
    HostRecord,
    apply_host_settings,
    boot_timeout,
    check_nothing_left,
    check_pool_emptied,
    mode_domain,
)
from dksm.dedup import ksm
from dksm.error import DksmError
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec, KsmScope
from dksm.vmm.config import DEFAULT_BOOT_ARGS, VmConfig
from dksm.vmm.confinement import credentials

PLACEMENTS: Final = ("same-core", "other-core", "alone")
# KSM's settings in the KSM modes.  "default" is the kernel's; "aggressive" is
# ksmtuned's ceiling (KSM_NPAGES_MAX 1250 at its KSM_SLEEP_MSEC 10), what a host
# tuned to merge quickly runs.
KSM_SETTINGS: Final[dict[str, tuple[int, int]]] = {
    "default": (100, 20),
    "aggressive": (1250, 10),
}
KSM_OFF: Final = "off"  # the ksm_setting of rows whose mode does not use KSM
DEFAULT_BACKGROUND: Final = ("hello", "idle", "cowprobe", "compute")
JSON_NAME: Final = "runtime.json"
PLOT_NAME: Final = "runtime.png"
PERF_PLOT_NAME: Final = "runtime-perf.png"


class RuntimeBenchError(DksmError):
    """The run-time experiment cannot run as asked, or a measured run failed."""


@dataclass(frozen=True)
class RuntimeConfig:
    image: str | None  # the measured guest: a shipped guest name or an image path
    config_file: str | None = None  # ... or a Firecracker config file
    boot_args: str | None = None  # its command line (images that are not shipped guests)
    rounds: int = 100  # the shipped `compute`'s rounds=N (about 25 ms each under PVM)
    runs: int = 10
    modes: Sequence[DedupMode] = tuple(DedupMode)
    placements: Sequence[str] = ("same-core", "other-core")
    ksm_settings: Sequence[str] = ("default", "aggressive")
    aggressive: tuple[int, int] = KSM_SETTINGS["aggressive"]  # pages_to_scan, sleep ms
    background: Sequence[str] = DEFAULT_BACKGROUND
    background_configs: Sequence[str] = ()
    background_boot_args: str | None = None
    background_instances: int = 5  # per image: 4 x 5 = 20, the thesis's "about twenty"
    background_touch_kib: int = 4096  # each background kit guest's own data (heap)
    vms_per_worker: int = 8  # of the background
    mem_mib: int = 16
    cpus: tuple[int, int] = (0, 1)  # (background and ksmd, measured VM when apart)
    ksm_scope: KsmScope = KsmScope.RAM
    thp: str | None = None
    settle: float = 2.0  # seconds between the background's boot and the first run
    # Rows are run in this many passes, each doing its share of the runs with a fresh
    # background, so that a change in the host's load spreads over every row.
    passes: int = 1
    timeout: float = 300.0  # per measured run
    use_perf: bool = True  # count hardware events with perf stat where available
    confine: bool = True  # every VMM confined once built, as dksm run and fleet up do
    out_dir: Path = Path("out/runtime")
    pool_root: Path | None = None

    def knobs(self, setting: str) -> dict[str, int | str]:
        pages, sleep_ms = self.aggressive if setting == "aggressive" else KSM_SETTINGS[setting]
        knobs: dict[str, int | str] = {
            "pages_to_scan": pages,
            "sleep_millisecs": sleep_ms,
            "run": ksm.RUN_MERGE,
        }
        if (ksm.KSM_SYSFS / "advisor_mode").exists():  # kernels before 6.9 have none
            knobs["advisor_mode"] = "none"  # the rate is ours, not the advisor's
        return knobs

    def describe_setting(self, setting: str) -> str:
        if setting == KSM_OFF:
            return "KSM off"
        knobs = self.knobs(setting)
        return f"{knobs['pages_to_scan']} pages / {knobs['sleep_millisecs']} ms"

    def measured(self) -> tuple[str, VmConfig]:
        """(label, config) of the measured guest."""
        from dksm.guests import IMAGES_DIR, resolve_image
        from dksm.vmm.config import FLEET_REFUSED_SECTIONS, from_firecracker_json

        if self.config_file is not None:
            # Its console goes to the run's own log, as a fleet VM's does.
            config = from_firecracker_json(self.config_file, refuse=FLEET_REFUSED_SECTIONS).vm
            return Path(config.kernel_path).stem, config
        if self.image is None:
            raise RuntimeBenchError("the run-time experiment needs an image or a config file")
        path = resolve_image(self.image)
        if path.parent == Path(IMAGES_DIR):  # a kit guest: it shuts down when done
            args = f"{DEFAULT_BOOT_ARGS} rounds={self.rounds}"
            if self.boot_args is not None:
                args = self.boot_args
        else:
            args = DEFAULT_BOOT_ARGS if self.boot_args is None else self.boot_args
        return path.stem, VmConfig(str(path), boot_args=args, mem_mib=self.mem_mib)

    def background_fleet(self) -> FleetBenchConfig:
        return FleetBenchConfig(
            images=self.background,
            instances=self.background_instances,
            modes=(),
            mem_mib=self.mem_mib,
            touch_kib=self.background_touch_kib,
            configs=self.background_configs,
            boot_args=self.background_boot_args,
            pool_root=self.pool_root,
        )

    def rows(self) -> list[tuple[DedupMode, str, str]]:
        """(mode, placement, ksm_setting) of every row, in the order they run."""
        return [
            (mode, placement, setting)
            for placement in self.placements
            for mode in self.modes
            for setting in (self.ksm_settings if mode.uses_ksm else (KSM_OFF,))
        ]

    def validate(self) -> None:
        if self.runs < 1:
            raise RuntimeBenchError(f"--runs must be at least 1, not {self.runs}")
        if not 1 <= self.passes <= self.runs:
            raise RuntimeBenchError(
                f"--passes must be 1 to --runs ({self.runs}), not {self.passes}"
            )
        if self.rounds < 1:
            raise RuntimeBenchError(f"--rounds must be at least 1, not {self.rounds}")
        if self.background_instances < 0:
            raise RuntimeBenchError("--background-instances cannot be negative")
        for placement in self.placements:
            if placement not in PLACEMENTS:
                raise RuntimeBenchError(
                    f"unknown placement '{placement}'; choose from {', '.join(PLACEMENTS)}"
                )
        for setting in self.ksm_settings:
            if setting not in KSM_SETTINGS:
                raise RuntimeBenchError(
                    f"unknown KSM setting '{setting}'; choose from {', '.join(KSM_SETTINGS)}"
                )
        if not (self.placements and self.modes and self.ksm_settings):
            raise RuntimeBenchError("name at least one mode, placement and KSM setting")
        usable = os.sched_getaffinity(0)
        needed = {self.cpus[0]} | (
            {self.cpus[1]} if {"other-core", "alone"} & set(self.placements) else set()
        )
        if not needed <= usable:
            raise RuntimeBenchError(
                f"CPU(s) {sorted(needed - usable)} are not available to this process "
                f"(it may run on {sorted(usable)}); choose others with --cpus"
            )
        if self.cpus[0] == self.cpus[1] and "other-core" in self.placements:
            raise RuntimeBenchError("other-core needs two different CPUs in --cpus")


@dataclass(frozen=True)
class RunSample:
    """One measured run: the VMM process, as the kernel and perf saw it."""

    run_time_s: float  # the guest: first instruction to shutdown
    elapsed_s: float  # the process: start to exit
    build_s: float  # building the VM (mapping, loading, pool) inside the process
    minor_faults: int
    major_faults: int
    voluntary_switches: int
    involuntary_switches: int
    user_s: float
    system_s: float
    ksmd_cpu_s: float  # ksmd's CPU time while the run lasted
    perf: dict[str, int | None] = field(default_factory=dict)

    @property
    def context_switches(self) -> int:
        return self.voluntary_switches + self.involuntary_switches

    @property
    def waiting_s(self) -> float:
        """Time the process spent off its CPU: for a compute-bound VMM, waiting for a
        CPU that something else (ksmd, the background, the rest of the host) held."""
        return max(0.0, self.elapsed_s - self.user_s - self.system_s)


# The per-run figures a row summarises, with how they are read off a sample.
METRICS: Final[dict[str, Callable[[RunSample], float]]] = {
    "run_time_s": lambda s: s.run_time_s,
    "elapsed_s": lambda s: s.elapsed_s,
    "minor_faults": lambda s: s.minor_faults,
    "major_faults": lambda s: s.major_faults,
    "context_switches": lambda s: s.context_switches,
    "involuntary_switches": lambda s: s.involuntary_switches,
    "user_s": lambda s: s.user_s,
    "system_s": lambda s: s.system_s,
    "cpu_s": lambda s: s.user_s + s.system_s,
    "waiting_s": lambda s: s.waiting_s,
    "ksmd_cpu_s": lambda s: s.ksmd_cpu_s,
}


@dataclass
class RuntimeRow:
    mode: str
    placement: str
    ksm_setting: str
    background_vms: int
    samples: list[RunSample] = field(default_factory=list)
    load_average_1m: float = 0.0  # the host's, when the row began (other work competes)

    def spread(self, values: Sequence[float]) -> dict[str, float]:
        first, third = quartiles(values)
        return {
            "median": statistics.median(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "q1": first,
            "q3": third,
        }

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "mode": self.mode,
            "placement": self.placement,
            "ksm_setting": self.ksm_setting,
            "background_vms": self.background_vms,
            "runs": len(self.samples),
            "load_average_1m": round(self.load_average_1m, 2),
        }
        for name, read in METRICS.items():
            for stat, value in self.spread([read(s) for s in self.samples]).items():
                doc[f"{name}_{stat}"] = round(value, 6)
        events = sorted({e for s in self.samples for e in s.perf})
        doc["perf_median"] = {
            event: statistics.median(counted)
            if (counted := [v for s in self.samples if (v := s.perf.get(event)) is not None])
            else None
            for event in events
        }
        doc["samples"] = [
            {**asdict(s), **{name: read(s) for name, read in METRICS.items()}} for s in self.samples
        ]
        return doc


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method: never beyond the values)."""
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, third


@contextlib.contextmanager
def on_cpus(cpus: set[int]) -> Iterator[None]:
    """Run this thread on ``cpus`` for a while: whatever it starts inherits them."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_runtime_bench(
    cfg: RuntimeConfig, *, on_row: Callable[[RuntimeRow], None] | None = None
) -> tuple[list[RuntimeRow], HostRecord, perf_counters.PerfProbe]:
    """Every row of the experiment, in one KSM session."""
    cfg.validate()
    if not ksm.ksm_controllable():
        raise RuntimeBenchError("the run-time experiment needs root and KSM (/sys/kernel/mm/ksm)")
    label, measured = cfg.measured()
    measured.validate()
    background = cfg.background_fleet().vm_configs() if cfg.background_instances else []
    probe = perf_counters.probe() if cfg.use_perf else perf_counters.PerfProbe((), "not asked")
    rows: dict[tuple[DedupMode, str, str], RuntimeRow] = {}
    with ksm.KsmSession() as session, tempfile.TemporaryDirectory(prefix="dksm-rt-") as scratch:
        host = apply_host_settings(session, cfg.thp)
        for done in range(cfg.passes):
            runs = cfg.runs * (done + 1) // cfg.passes - cfg.runs * done // cfg.passes
            for key in cfg.rows():
                row = _run_row(
                    cfg, session, *key, (label, measured), background, probe,
                    Path(scratch), runs, rows.get(key),
                )  # fmt: skip
                rows[key] = row
                if on_row is not None and done == cfg.passes - 1:
                    on_row(row)
    return list(rows.values()), host, probe


def _run_row(
    cfg: RuntimeConfig,
    session: ksm.KsmSession,
    mode: DedupMode,
    placement: str,
    setting: str,
    measured: tuple[str, VmConfig],
    background: Sequence[tuple[str, VmConfig]],
    probe: perf_counters.PerfProbe,
    scratch: Path,
    runs: int,
    row: RuntimeRow | None,
) -> RuntimeRow:
    """``runs`` more runs of a row (a new one, or ``row`` of an earlier pass)."""
    fleet_cpu, apart_cpu = cfg.cpus
    measured_cpu = fleet_cpu if placement == "same-core" else apart_cpu
    domain = mode_domain(mode, "runtime")
    session.apply(**cfg.knobs(setting)) if mode.uses_ksm else session.apply(run=ksm.RUN_STOP)
    session.pin_ksmd({fleet_cpu})
    specs = (
        []
        if placement == "alone"
        else [
            (label, InstanceSpec(config, mode, domain, cfg.pool_root, cfg.ksm_scope))
            for label, config in background
            for _ in range(cfg.background_instances)
        ]
    )
    if row is None:
        row = RuntimeRow(mode.value, placement, setting, len(specs), [], os.getloadavg()[0])
    handle: control.FleetHandle | None = None
    try:
        if specs:
            with on_cpus({fleet_cpu}):
                handle = control.up(
                    specs,
                    boot_timeout=boot_timeout(len(specs)),
                    vms_per_worker=cfg.vms_per_worker,
                    hold=True,
                    no_confine=not cfg.confine,
                )
        time.sleep(cfg.settle)
        spec = InstanceSpec(measured[1], mode, domain, cfg.pool_root, cfg.ksm_scope)
        for _ in range(runs):
            work = scratch / f"{domain}-{placement}-{setting}-{len(row.samples)}"
            work.mkdir()
            row.samples.append(_measure_once(cfg, spec, measured_cpu, probe, work))
    finally:
        if handle is not None:
            handle.down()
            check_nothing_left(handle, domain, cfg.pool_root, mode)
        elif mode.uses_pool:
            check_pool_emptied(domain, cfg.pool_root)
    return row


def _measure_once(
    cfg: RuntimeConfig,
    spec: InstanceSpec,
    cpu: int,
    probe: perf_counters.PerfProbe,
    work: Path,
) -> RunSample:
    order = work / "order.json"
    console, result, stat = work / "console.log", work / "result.json", work / "perf.csv"
    order.write_text(
        json.dumps(
            {
                "spec": control.spec_to_json("measured", spec),
                "confine": control.confinement_to_json(credentials() if cfg.confine else None),
                "timeout": cfg.timeout,
                "console": str(console),
                "result": str(result),
            }
        )
    )
    argv = [sys.executable, "-m", "dksm.bench.guest_run", str(order)]
    if probe.available:
        argv = perf_counters.command(argv, probe.events, stat)
    ksmd_before = ksm.ksmd_runtime_seconds()
    started = time.monotonic()
    with on_cpus({cpu}):
        pid = os.posix_spawnp(
            argv[0],
            argv,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(work / "stdout"), os.O_WRONLY | os.O_CREAT, 0o600),
                (os.POSIX_SPAWN_OPEN, 2, str(work / "stderr"), os.O_WRONLY | os.O_CREAT, 0o600),
            ],
        )
    status, usage = _wait(pid, cfg.timeout + 60)
    elapsed = time.monotonic() - started
    ksmd = ksm.ksmd_runtime_seconds() - ksmd_before
    code = os.waitstatus_to_exitcode(status)
    written = result.exists() and result.stat().st_size > 0
    if code != 0 or not written:
        errors = (work / "stderr").read_text(errors="replace").strip().splitlines()
        ending = json.loads(result.read_text())["ending"] if written else ""
        raise RuntimeBenchError(
            f"a measured run of {Path(spec.config.kernel_path).name} ended with status {code}"
            f"{': ' + ending if ending else ''}{' (' + errors[-1] + ')' if errors else ''}"
        )
    timing = json.loads(result.read_text())
    return RunSample(
        run_time_s=timing["run_s"],
        elapsed_s=elapsed,
        build_s=timing["build_s"],
        minor_faults=usage.ru_minflt,
        major_faults=usage.ru_majflt,
        voluntary_switches=usage.ru_nvcsw,
        involuntary_switches=usage.ru_nivcsw,
        user_s=usage.ru_utime,
        system_s=usage.ru_stime,
        ksmd_cpu_s=ksmd,
        perf=perf_counters.read(stat) if probe.available else {},
    )


def _wait(pid: int, timeout: float) -> tuple[int, resource.struct_rusage]:
    """Wait for the child without using CPU; kill it if it overruns or we are stopped."""
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise RuntimeBenchError(f"a measured run did not end within {timeout:g} s")
        _, status, usage = os.wait4(pid, 0)
        return status, usage
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        with contextlib.suppress(ChildProcessError):
            os.wait4(pid, 0)
        raise
    finally:
        os.close(pidfd)
