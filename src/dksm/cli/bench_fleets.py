"""``dksm bench fleet``, ``runtime`` and ``duplicates``: the benchmarks that run
fleets, their shared options (images, instances, KSM settings, host settings) and
their handlers; ``dksm demo`` takes the fleet benchmark's options too.
:mod:`dksm.cli.bench` registers them beside the single-VM benchmarks.
"""

from __future__ import annotations

import argparse
import json

from dksm.vmm.exit_status import ExitStatus


def add_fleet_options(parser: argparse.ArgumentParser, *, demo: bool = False) -> None:
    parser.add_argument(
        "--image",
        action="append",
        default=None,
        metavar="NAME_OR_PATH",
        help="shipped guest or image path (repeatable; default: the idle-style shipped apps)",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="JSON",
        help="a Firecracker config file: one more kind of VM, with its kernel, boot args, "
        "initrd and memory (repeatable)",
    )
    parser.add_argument(
        "--boot-args",
        default=None,
        help="command line of --image paths that are not shipped guests",
    )
    parser.add_argument("--instances", type=int, default=16 if demo else 10, help="VMs per image")
    parser.add_argument(
        "--modes", default="none,ksm,dksm,dksm+ksm", help="dedup modes to run, in order"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=40.0 if demo else 60.0,
        metavar="S",
        help="longest sampling time per mode",
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, metavar="S", help="seconds between samples"
    )
    parser.add_argument(
        "--from-launch",
        action="store_true",
        help="the thesis's way: time 0 when the first VM starts (boot is on the curve), "
        "every mode sampled for the whole --duration",
    )
    parser.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM (16)")
    add_vms_per_process_option(parser, default=8)
    parser.add_argument(
        "--touch-kib",
        type=int,
        default=2048 if demo else 0,
        metavar="KIB",
        help="RAM each guest fills with unique pages, as a running app's heap"
        " (what KSM must scan and can never merge)",
    )
    parser.add_argument(
        "--ksm-pages-to-scan", type=int, default=None, help="ksmd pages per pass (default 100)"
    )
    parser.add_argument(
        "--ksm-sleep-ms", type=int, default=None, help="ksmd sleep between passes (20)"
    )
    parser.add_argument(
        "--ksm-advisor", action="store_true", help="let the kernel's advisor pick KSM's scan rate"
    )
    add_host_options(parser)
    parser.add_argument(
        "--out",
        default="out/demo" if demo else "out/fleet",
        metavar="DIR",
        help="where results and plots go",
    )
    parser.add_argument("--json", action="store_true", help="print summary.json")


def add_vms_per_process_option(parser: argparse.ArgumentParser, *, default: int) -> None:
    parser.add_argument(
        "--vms-per-process",
        type=int,
        default=default,
        metavar="K",
        help=f"VMs hosted per worker process (default {default}); 1 gives every VM a "
        "process of its own, Firecracker's shape and the DKSM thesis's",
    )


def add_host_options(parser: argparse.ArgumentParser) -> None:
    """Options for the host-wide settings a memory experiment may change for its run."""
    parser.add_argument(
        "--thp",
        choices=("keep", "never"),
        default="keep",
        help="transparent huge pages during the run: as found (keep), or off (never, the "
        "DKSM thesis's setting); recorded in the results and restored afterwards",
    )
    parser.add_argument(
        "--ksm-scope",
        choices=("ram", "text"),
        default="ram",
        help="what KSM modes advise MADV_MERGEABLE: all guest RAM (ram, as QEMU and Cloud "
        "Hypervisor do) or only the image's code (text, as the thesis's Firecracker did)",
    )


def positive(value: float, what: str) -> None:
    from dksm.error import DksmError

    if not value > 0:
        raise DksmError(f"{what} must be positive, not {value:g}")


DEFAULT_FLEET_IMAGES = ("hello", "idle", "cowprobe")


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    measured = parser.add_mutually_exclusive_group()
    measured.add_argument(
        "--image",
        default=None,
        metavar="NAME_OR_PATH",
        help="the measured guest: a shipped guest or an image that shuts down when done "
        "(default: the shipped compute)",
    )
    measured.add_argument("--config-file", default=None, metavar="JSON", help="... or its config")
    parser.add_argument("--boot-args", default=None, help="the measured guest's command line")
    parser.add_argument(
        "--rounds",
        type=int,
        default=100,
        help="work of the shipped compute (rounds=N; about 25 ms each on a PVM host)",
    )
    parser.add_argument("--runs", type=int, default=10, help="measured runs per row (thesis: 10)")
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="do the rows this many times over, each with its share of the runs and a fresh "
        "background, so that changes in the host's load spread over every row",
    )
    parser.add_argument(
        "--modes", default="none,ksm,dksm,dksm+ksm", help="dedup modes to run, in order"
    )
    parser.add_argument(
        "--placements",
        default="same-core,other-core",
        help="same-core (measured VM, background and ksmd on one CPU), other-core (the "
        "measured VM on a CPU of its own), alone (no background)",
    )
    parser.add_argument(
        "--ksm-settings",
        default="default,aggressive",
        help="KSM's scan rate in the KSM modes: default (100 pages / 20 ms) and/or "
        "aggressive (--ksm-aggressive)",
    )
    parser.add_argument(
        "--ksm-aggressive",
        default="1250/10",
        metavar="PAGES/MS",
        help="pages_to_scan / sleep_millisecs of 'aggressive' (default ksmtuned's ceiling)",
    )
    parser.add_argument(
        "--background",
        action="append",
        default=None,
        metavar="NAME_OR_PATH",
        help="a kind of background VM (repeatable; default: hello, idle, cowprobe, compute)",
    )
    parser.add_argument(
        "--background-config-file",
        action="append",
        default=[],
        metavar="JSON",
        help="a Firecracker config file: one more kind of background VM (repeatable)",
    )
    parser.add_argument(
        "--background-boot-args", default=None, help="command line of background image paths"
    )
    parser.add_argument(
        "--background-instances", type=int, default=5, metavar="N", help="VMs per kind (5)"
    )
    parser.add_argument(
        "--background-touch-kib",
        type=int,
        default=4096,
        metavar="KIB",
        help="unique RAM each shipped background guest fills, for ksmd to scan (4096)",
    )
    add_vms_per_process_option(parser, default=8)
    parser.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM (16)")
    parser.add_argument(
        "--cpus",
        default="0,1",
        metavar="A,B",
        help="CPU A runs the background and ksmd (and the measured VM in same-core); "
        "CPU B the measured VM in other-core and alone",
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, metavar="S", help="wait after the background boots"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="longest measured run"
    )
    parser.add_argument(
        "--no-perf", action="store_true", help="do not count hardware events with perf stat"
    )
    parser.add_argument(
        "--no-confine",
        action="store_true",
        help="run every VMM unconfined (default: confined once built, as dksm run does)",
    )
    add_host_options(parser)
    parser.add_argument(
        "--out", default="out/runtime", metavar="DIR", help="where results and plots go"
    )
    parser.add_argument("--json", action="store_true", help="print runtime.json")


def add_duplicates_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        action="append",
        default=None,
        metavar="NAME_OR_PATH",
        help="a kind of VM (repeatable; default: hello, idle, cowprobe, compute)",
    )
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="JSON",
        help="a Firecracker config file: one more kind of VM (repeatable)",
    )
    parser.add_argument("--boot-args", default=None, help="command line of image paths")
    parser.add_argument("--steps", type=int, default=10, help="instances of each image at the end")
    parser.add_argument(
        "--modes", default="none,ksm,dksm,dksm+ksm", help="dedup modes to run, in order"
    )
    parser.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM (16)")
    add_vms_per_process_option(parser, default=1)
    parser.add_argument(
        "--touch-kib",
        type=int,
        default=0,
        metavar="KIB",
        help="RAM each shipped guest fills with unique pages (0)",
    )
    parser.add_argument(
        "--interval", type=float, default=0.5, metavar="S", help="seconds between samples"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        metavar="S",
        help="a step is measured once memory held within 1%% for S seconds",
    )
    parser.add_argument(
        "--step-timeout", type=float, default=30.0, metavar="S", help="longest wait per step"
    )
    parser.add_argument(
        "--ksm-pages-to-scan", type=int, default=None, help="ksmd pages per pass (default 100)"
    )
    parser.add_argument(
        "--ksm-sleep-ms", type=int, default=None, help="ksmd sleep between passes (20)"
    )
    add_host_options(parser)
    parser.add_argument(
        "--out", default="out/duplicates", metavar="DIR", help="where results and plots go"
    )
    parser.add_argument("--json", action="store_true", help="print duplicates.json")


def run_duplicates(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from dksm.bench.duplicates import DuplicatesConfig, run_duplicates, table, write_outputs
    from dksm.bench.fleet import KsmKnobs
    from dksm.fleet.instance import DedupMode, KsmScope

    for value, what in (
        (args.steps, "--steps"),
        (args.mem_mib, "--mem-mib"),
        (args.vms_per_process, "--vms-per-process"),
        (args.interval, "--interval"),
        (args.settle, "--settle"),
        (args.step_timeout, "--step-timeout"),
    ):
        positive(value, what)
    cfg = DuplicatesConfig(
        images=args.image or ([] if args.config_file else ["hello", "idle", "cowprobe", "compute"]),
        configs=args.config_file,
        boot_args=args.boot_args,
        steps=args.steps,
        modes=DedupMode.parse_list(args.modes),
        knobs=KsmKnobs(args.ksm_pages_to_scan, args.ksm_sleep_ms),
        mem_mib=args.mem_mib,
        vms_per_worker=args.vms_per_process,
        touch_kib=args.touch_kib,
        interval=args.interval,
        settle_seconds=args.settle,
        step_timeout=args.step_timeout,
        ksm_scope=KsmScope.parse(args.ksm_scope),
        thp=None if args.thp == "keep" else args.thp,
        out_dir=Path(args.out),
    )
    err = Console(stderr=True)

    def progress(mode: str, step: object) -> None:
        from dksm.bench.duplicates import StepResult

        assert isinstance(step, StepResult)
        note = "" if step.settled else f" (not settled after {step.waited_s:g} s)"
        err.print(
            f"{mode:>8}: {step.instances_per_image} per image, {step.vms} VMs, "
            f"{step.memory_bytes / (1 << 20):.1f} MiB{note}"
        )

    results, host = run_duplicates(cfg, on_step=progress)
    doc = write_outputs(cfg, results, host)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        console = Console()
        console.print(table(doc))
        console.print(f"duplicates.json and duplicates.png in {cfg.out_dir}/")
    return ExitStatus.OK


def run_runtime(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from dksm.bench.runtime import RuntimeConfig, run_runtime_bench
    from dksm.bench.runtime_report import table, write_outputs
    from dksm.error import DksmError
    from dksm.fleet.instance import DedupMode, KsmScope

    cpus = ints_from(args.cpus, "--cpus", minimum=0)
    aggressive = args.ksm_aggressive.split("/")
    if len(cpus) != 2:
        raise DksmError(f"--cpus names two CPUs, A,B, not '{args.cpus}'")
    if len(aggressive) != 2:
        raise DksmError(f"--ksm-aggressive is PAGES/MS, not '{args.ksm_aggressive}'")
    pages, sleep_ms = (
        ints_from(aggressive[0], "--ksm-aggressive pages")[0],
        ints_from(aggressive[1], "--ksm-aggressive ms", minimum=0)[0],
    )
    for value, what in ((args.mem_mib, "--mem-mib"), (args.vms_per_process, "--vms-per-process"),
                        (args.timeout, "--timeout")):  # fmt: skip
        positive(value, what)
    if args.settle < 0:
        raise DksmError(f"--settle cannot be negative, not {args.settle:g}")
    cfg = RuntimeConfig(
        image=args.image or (None if args.config_file else "compute"),
        config_file=args.config_file,
        boot_args=args.boot_args,
        rounds=args.rounds,
        runs=args.runs,
        passes=args.passes,
        modes=DedupMode.parse_list(args.modes),
        placements=[p.strip() for p in args.placements.split(",") if p.strip()],
        ksm_settings=[k.strip() for k in args.ksm_settings.split(",") if k.strip()],
        aggressive=(pages, sleep_ms),
        background=args.background
        or ([] if args.background_config_file else ["hello", "idle", "cowprobe", "compute"]),
        background_configs=args.background_config_file,
        background_boot_args=args.background_boot_args,
        background_instances=args.background_instances,
        background_touch_kib=args.background_touch_kib,
        vms_per_worker=args.vms_per_process,
        mem_mib=args.mem_mib,
        cpus=(cpus[0], cpus[1]),
        ksm_scope=KsmScope.parse(args.ksm_scope),
        thp=None if args.thp == "keep" else args.thp,
        settle=args.settle,
        timeout=args.timeout,
        use_perf=not args.no_perf,
        confine=not args.no_confine,
        out_dir=Path(args.out),
    )
    console = Console(stderr=True)

    def progress(row: object) -> None:
        import statistics

        from dksm.bench.runtime import RuntimeRow

        assert isinstance(row, RuntimeRow)
        times = [s.run_time_s for s in row.samples]
        console.print(
            f"{row.placement:>10} {row.mode:>8} KSM {row.ksm_setting:<10} "
            f"run time median {statistics.median(times):.3f} s over {len(times)} runs"
        )

    rows, host, probe = run_runtime_bench(cfg, on_row=progress)
    doc = write_outputs(cfg, rows, host, probe)
    if args.json:
        print(json.dumps(doc, indent=2))
        return ExitStatus.OK
    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 150))
    out.print(table(doc))
    if not probe.available:
        out.print(f"hardware counters: none ({probe.reason})")
    out.print(f"runtime.json and runtime.png in {cfg.out_dir}/")
    return ExitStatus.OK


def run_fleet_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from dksm.bench.fleet import FleetBenchConfig, KsmKnobs, run_fleet_bench
    from dksm.bench.fleet_report import table, write_outputs
    from dksm.fleet.instance import DedupMode, KsmScope

    for value, what in (
        (args.instances, "--instances"),
        (args.duration, "--duration"),
        (args.interval, "--interval"),
        (args.vms_per_process, "--vms-per-process"),
        (args.mem_mib, "--mem-mib"),
    ):
        positive(value, what)
    images = args.image or ([] if args.config_file else list(DEFAULT_FLEET_IMAGES))
    cfg = FleetBenchConfig(
        images=images,
        instances=args.instances,
        modes=DedupMode.parse_list(args.modes),
        duration=args.duration,
        mem_mib=args.mem_mib,
        knobs=KsmKnobs(args.ksm_pages_to_scan, args.ksm_sleep_ms, args.ksm_advisor),
        out_dir=Path(args.out),
        vms_per_worker=args.vms_per_process,
        touch_kib=args.touch_kib,
        configs=args.config_file,
        boot_args=args.boot_args,
        interval=args.interval,
        from_launch=args.from_launch,
        thp=None if args.thp == "keep" else args.thp,
        ksm_scope=KsmScope.parse(args.ksm_scope),
    )
    results, host = run_fleet_bench(cfg)
    summary = write_outputs(cfg, results, host)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console = Console()
        console.print(table(results))
        console.print(f"series, summary.json and memory.png in {cfg.out_dir}/")
    return ExitStatus.OK


def ints(text: str, what: str) -> list[int]:
    return ints_from(text, what)


def ints_from(text: str, what: str, *, minimum: int = 1) -> list[int]:
    from dksm.error import DksmError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DksmError(f"{what} must be comma-separated whole numbers, not '{text}'") from None
    if not values or min(values) < minimum:
        kind = "positive" if minimum == 1 else f"at least {minimum}"
        raise DksmError(f"{what} must be {kind} whole numbers, not '{text}'")
    return values
