"""``dksm bench``: the project's measurements."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dksm.vmm.exit_status import ExitStatus


def register(sub: Any) -> None:
    parser = sub.add_parser("bench", help="run a benchmark")
    bsub = parser.add_subparsers(
        dest="bench_command", required=True, metavar="BENCHMARK", prog="dksm bench"
    )
    boot = bsub.add_parser("boot", help="time from process start to first serial byte and exit")
    boot.add_argument("--guest", default="hello", help="shipped guest name or image path")
    boot.add_argument("--runs", type=int, default=20, help="boots to time (20)")
    boot.add_argument("--dedup", default="dksm", help="dedup mode of the runs (dksm)")
    boot.add_argument("--boot-args", default=None, help="the guest's command line")
    boot.add_argument("--initrd", default=None, help="an initial ramdisk to load")
    boot.add_argument(
        "--tsc-leaf",
        choices=("on", "off", "both"),
        default="on",
        help="announce the TSC frequency in CPUID (on), hide it (off), or compare both",
    )
    boot.add_argument(
        "--confinement",
        choices=("on", "off", "compare"),
        default="on",
        help="run the VMMs confined (on, as dksm run does), with --no-confine (off), or"
        " alternate both (compare)",
    )
    boot.add_argument("--json", action="store_true", help="print the result as JSON")
    boot.set_defaults(handler=_boot)
    density = bsub.add_parser("density", help="per-VM host memory of idle fleets of growing size")
    density.add_argument("--image", default="idle", help="guest to pack (idle)")
    density.add_argument("--sizes", default="1,16,64,256", help="fleet sizes (comma-separated)")
    density.add_argument(
        "--vms-per-process",
        default="1,8",
        metavar="K[,K...]",
        help="VMs hosted per worker process, one run per value",
    )
    density.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM (16)")
    density.add_argument("--json", action="store_true", help="print the results as JSON")
    density.set_defaults(handler=_density)
    merge = bsub.add_parser("merge-cost", help="CPU per merged page, dksm vs KSM (the thesis's)")
    merge.add_argument("--processes", type=int, default=64, help="processes advising (64)")
    merge.add_argument(
        "--pages",
        default=None,
        metavar="N[,N...]|FIRST:LAST:STEP",
        help="pages per process, one run per value (default 100,1000,5000,10000; with "
        "--thesis the thesis's 100:10000:100)",
    )
    merge.add_argument("--methods", default=None, help="dksm,ksm (with --thesis: none,ksm,dksm)")
    merge.add_argument(
        "--thesis",
        action="store_true",
        help="the thesis's program and metric: wall time of P processes that each write, "
        "advise and unmap N pages, KSM at its untouched scan settings; beside it the "
        "merging CPU per page",
    )
    merge.add_argument(
        "--out", default="out/merge-cost", metavar="DIR", help="where results and plots go"
    )
    merge.add_argument("--json", action="store_true", help="print the results as JSON")
    merge.set_defaults(handler=_merge_cost)
    emulation = bsub.add_parser(
        "emulation", help="cost of one instruction emulated in user space (PVM hosts)"
    )
    emulation.add_argument(
        "--iterations", type=int, default=2000, help="instructions per run (2000)"
    )
    emulation.add_argument("--runs", type=int, default=5, help="runs to time (5)")
    emulation.add_argument("--json", action="store_true", help="print the results as JSON")
    emulation.set_defaults(handler=_emulation)
    fleet = bsub.add_parser("fleet", help="memory over time of a fleet under each dedup mode")
    add_fleet_options(fleet)
    fleet.set_defaults(handler=_fleet)
    runtime = bsub.add_parser(
        "runtime",
        help="run time of a compute-bound guest beside a background fleet, per dedup mode "
        "and CPU placement (the thesis's: does ksmd slow guests down?)",
    )
    _add_runtime_options(runtime)
    runtime.set_defaults(handler=_runtime)
    duplicates = bsub.add_parser(
        "duplicates",
        help="memory as one more instance of every image starts per step, per dedup mode",
    )
    _add_duplicates_options(duplicates)
    duplicates.set_defaults(handler=_duplicates)
    layouts = bsub.add_parser(
        "layouts", help="fleet memory of aligned vs naive builds of the guest apps under dksm"
    )
    layouts.add_argument("--instances", type=int, default=8, help="VMs per app")
    layouts.add_argument(
        "--apps", default="hello,idle,compute,cowprobe", help="guest kit apps (comma-separated)"
    )
    layouts.add_argument(
        "--naive-dir",
        default=None,
        metavar="DIR",
        help="prebuilt naive images DIR/APP.elf (default: build them into a temporary "
        "directory with guests/build.py)",
    )
    layouts.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM (16)")
    layouts.add_argument("--json", action="store_true", help="print the results as JSON")
    layouts.set_defaults(handler=_layouts)
    _register_devices(bsub)


def _register_devices(bsub: Any) -> None:
    block = bsub.add_parser(
        "block", help="virtio-block sequential throughput against the host's own IO"
    )
    block.add_argument("--size-mib", type=int, default=128, help="bytes moved per pass")
    block.add_argument("--runs", type=int, default=5, help="passes to time (5)")
    block.add_argument("--dir", default=None, help="where the test file lives (default: TMPDIR)")
    block.add_argument("--json", action="store_true", help="print the result as JSON")
    block.set_defaults(handler=_devices, device_bench="block")
    net = bsub.add_parser(
        "net", help="round trips to a guest: ICMP and UDP over a tap, and vsock (root)"
    )
    net.add_argument("--count", type=int, default=200, help="round trips per path")
    net.add_argument("--json", action="store_true", help="print the result as JSON")
    net.set_defaults(handler=_devices, device_bench="net")
    initrd = bsub.add_parser(
        "initrd-sharing", help="fleet memory of VMs given one initrd, without and with the pool"
    )
    initrd.add_argument("--instances", type=int, default=16, help="VMs per run (16)")
    initrd.add_argument("--initrd-mib", type=int, default=4, help="initrd size (4 MiB)")
    initrd.add_argument(
        "--vms-per-process", type=int, default=8, metavar="K", help="VMs per worker (8)"
    )
    initrd.add_argument("--json", action="store_true", help="print the result as JSON")
    initrd.set_defaults(handler=_devices, device_bench="initrd")
    drive = bsub.add_parser(
        "drive-sharing", help="the host page cache of one read-only drive that many VMs read"
    )
    drive.add_argument("--instances", type=int, default=16, help="VMs per run (16)")
    drive.add_argument("--drive-mib", type=int, default=64, help="drive size (64 MiB)")
    drive.add_argument(
        "--vms-per-process", type=int, default=8, metavar="K", help="VMs per worker (8)"
    )
    drive.add_argument("--dir", default=None, help="where the drive file lives (default: TMPDIR)")
    drive.add_argument("--json", action="store_true", help="print the result as JSON")
    drive.set_defaults(handler=_devices, device_bench="drive")


def _devices(args: argparse.Namespace) -> int:
    from dksm.bench import virtio

    result: virtio.BlockResult | virtio.NetResult | virtio.InitrdResult | virtio.DriveResult
    if args.device_bench == "block":
        result = virtio.bench_block(args.size_mib, args.runs, args.dir)
    elif args.device_bench == "net":
        result = virtio.bench_net(args.count)
    elif args.device_bench == "initrd":
        result = virtio.bench_initrd_sharing(args.instances, args.initrd_mib, args.vms_per_process)
    else:
        result = virtio.bench_drive_sharing(
            args.instances, args.drive_mib, args.vms_per_process, args.dir
        )
    print(json.dumps(virtio.to_json(result), indent=2) if args.json else result.table())
    return ExitStatus.OK


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


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
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


def _add_duplicates_options(parser: argparse.ArgumentParser) -> None:
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


def _duplicates(args: argparse.Namespace) -> int:
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
        modes=[DedupMode.parse(m.strip()) for m in args.modes.split(",") if m.strip()],
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


def _runtime(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from dksm.bench.runtime import RuntimeConfig, run_runtime_bench, table, write_outputs
    from dksm.error import DksmError
    from dksm.fleet.instance import DedupMode, KsmScope

    cpus = _ints_from(args.cpus, "--cpus", minimum=0)
    aggressive = args.ksm_aggressive.split("/")
    if len(cpus) != 2:
        raise DksmError(f"--cpus names two CPUs, A,B, not '{args.cpus}'")
    if len(aggressive) != 2:
        raise DksmError(f"--ksm-aggressive is PAGES/MS, not '{args.ksm_aggressive}'")
    pages, sleep_ms = (
        _ints_from(aggressive[0], "--ksm-aggressive pages")[0],
        _ints_from(aggressive[1], "--ksm-aggressive ms", minimum=0)[0],
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
        modes=[DedupMode.parse(m.strip()) for m in args.modes.split(",") if m.strip()],
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

    from dksm.bench.fleet import FleetBenchConfig, KsmKnobs, run_fleet_bench, table, write_outputs
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
        modes=[DedupMode.parse(m.strip()) for m in args.modes.split(",") if m.strip()],
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


def _ints(text: str, what: str) -> list[int]:
    return _ints_from(text, what)


def _ints_from(text: str, what: str, *, minimum: int = 1) -> list[int]:
    from dksm.error import DksmError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DksmError(f"{what} must be comma-separated whole numbers, not '{text}'") from None
    if not values or min(values) < minimum:
        kind = "positive" if minimum == 1 else f"at least {minimum}"
        raise DksmError(f"{what} must be {kind} whole numbers, not '{text}'")
    return values


def _merge_cost(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from dksm.bench.merge_cost import run_merge_cost

    if args.thesis:
        return _merge_cost_thesis(args)
    methods = [m.strip() for m in (args.methods or "dksm,ksm").split(",") if m.strip()]
    pages = _pages(args.pages) if args.pages else [100, 1000, 5000, 10000]
    rows = run_merge_cost(args.processes, pages, Path(args.out), methods=methods)
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in rows]}, indent=2))
        return ExitStatus.OK
    table = Table(title=f"merge cost, {args.processes} processes")
    for col in ("method", "pages/process", "merged", "elapsed s", "CPU s", "CPU µs/merged page"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.method,
            str(r.pages),
            f"{r.pages_merged}/{r.pages_expected}",
            f"{r.elapsed_s:.2f}",
            f"{r.cpu_s:.3f}",
            f"{r.cpu_us_per_merged_page:.2f}",
        )
    Console().print(table)
    print(f"CSV and plot in {args.out}/")
    return ExitStatus.OK


def _pages(text: str) -> list[int]:
    """``N[,N...]`` or ``FIRST:LAST:STEP`` (LAST included)."""
    from dksm.error import DksmError

    if ":" not in text:
        return _ints(text, "--pages")
    parts = text.split(":")
    if len(parts) != 3:
        raise DksmError(f"--pages ranges are FIRST:LAST:STEP, not '{text}'")
    first, last, step = (_ints(part, "--pages")[0] for part in parts)
    if last < first:
        raise DksmError(f"--pages range '{text}' ends before it starts")
    return list(range(first, last + 1, step))


def _merge_cost_thesis(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from dksm.bench.merge_cost import THESIS_METHODS, THESIS_PAGES, run_thesis_sweep

    methods = [m.strip() for m in (args.methods or ",".join(THESIS_METHODS)).split(",")]
    pages = _pages(args.pages) if args.pages else list(THESIS_PAGES)
    err = Console(stderr=True)

    def progress(row: object) -> None:
        from dksm.bench.merge_cost import ThesisRow

        assert isinstance(row, ThesisRow)
        err.print(f"{row.method:>5} N={row.pages:>6}: {row.wall_s:.3f} s", highlight=False)

    rows, scan = run_thesis_sweep(
        args.processes, pages, Path(args.out), methods=[m for m in methods if m], on_row=progress
    )
    if args.json:
        print(json.dumps({"ksm_scan": scan, "rows": [asdict(r) for r in rows]}, indent=2))
        return ExitStatus.OK
    table = Table(title=f"the thesis's merge overhead, {args.processes} processes")
    for col in ("pages/process", *(f"{m} wall s" for m in methods), "dksm CPU µs/page"):
        table.add_column(col, justify="right")
    for count in pages:
        mine = {r.method: r for r in rows if r.pages == count}
        table.add_row(
            str(count),
            *(f"{mine[m].wall_s:.3f}" for m in methods if m in mine),
            f"{mine['dksm'].cpu_us_per_page:.2f}" if "dksm" in mine else "",
        )
    Console().print(table)
    print(f"CSV and plot in {args.out}/")
    return ExitStatus.OK


def _emulation(args: argparse.Namespace) -> int:
    from dksm.bench.emulation import measure_emulation

    result = measure_emulation(iterations=args.iterations, runs=args.runs)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    return ExitStatus.OK


def _density(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dksm.bench.density import run_density, table, to_json

    rows = run_density(
        args.image,
        _ints(args.sizes, "--sizes"),
        _ints(args.vms_per_process, "--vms-per-process"),
        args.mem_mib,
    )
    if args.json:
        print(json.dumps(to_json(rows), indent=2))
    else:
        Console().print(table(rows))
    return ExitStatus.OK


def _fleet(args: argparse.Namespace) -> int:
    return run_fleet_command(args)


# Ways of running one axis of a boot benchmark: name and extra ``dksm run`` flags.
_Axis = dict[str, list[tuple[str, list[str]]]]


def _boot(args: argparse.Namespace) -> int:
    from dksm.bench.boot import interpreter_ratios, measure_boot, median_differences, summary

    flags = []
    if args.boot_args is not None:
        flags += ["--boot-args", args.boot_args]
    if args.initrd is not None:
        flags += ["--initrd", args.initrd]
    # Each axis is one or two ways of running; every combination is a variant.
    leaf: _Axis = {"on": [("tsc leaf", [])], "off": [("no tsc leaf", ["--no-tsc-leaf"])]}
    leaf["both"] = leaf["on"] + leaf["off"]
    confinement: _Axis = {"on": [("confined", [])], "off": [("unconfined", ["--no-confine"])]}
    confinement["compare"] = confinement["on"] + confinement["off"]
    variants = {
        f"{c_name}, {l_name}": [*c_flags, *l_flags]
        for c_name, c_flags in confinement[args.confinement]
        for l_name, l_flags in leaf[args.tsc_leaf]
    }
    measured = measure_boot(args.guest, args.runs, dedup=args.dedup, flags=flags, variants=variants)
    results = measured.results
    differences = median_differences(results)
    ratios = interpreter_ratios(measured)
    bare = summary(measured.interpreter_ms)
    if args.json:
        docs = [r.to_json() for r in results]
        doc: dict[str, object] = (
            docs[0] if len(docs) == 1 else {"variants": docs, "differences_ms": differences}
        )
        doc["interpreter_ms"] = bare
        doc["first_byte_over_interpreter"] = (
            ratios[results[0].variant] if len(results) == 1 else ratios
        )
        print(json.dumps(doc, indent=2))
    else:
        print("\n\n".join(r.table() for r in results))
        for name, diff in differences.items():
            print(
                f"{name}: {diff['first_byte']:+.1f} ms to the first byte, "
                f"{diff['exit']:+.1f} ms to exit (medians)"
            )
        print(
            f"\nbare interpreter (python -c pass), same rounds: median {bare['median']:.1f} ms"
            f" (min {bare['min']:.1f}, max {bare['max']:.1f})"
        )
        for name, ratio in ratios.items():
            print(f"first byte / bare interpreter ({name}): {ratio:.2f}")
    return ExitStatus.OK


def _layouts(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from dksm.bench.layouts import naive_images, run_layouts, shipped_images, table, to_json
    from dksm.error import DksmError

    apps = [a.strip() for a in args.apps.split(",") if a.strip()]
    if not apps:
        raise DksmError("--apps names no app")
    if args.instances < 1:
        raise DksmError(f"--instances must be at least 1, not {args.instances}")
    aligned = shipped_images(apps)
    with contextlib.ExitStack() as stack:
        if args.naive_dir:
            naive = [Path(args.naive_dir) / f"{app}.elf" for app in apps]
        else:
            naive = stack.enter_context(naive_images(apps))
        rows = run_layouts(aligned, naive, args.instances, args.mem_mib)
    if args.json:
        print(json.dumps(to_json(rows, args.instances), indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:
            # Piped or captured: no terminal width to respect, so do not crop the table.
            console = Console(width=max(console.width, 120))
        console.print(table(rows))
    return ExitStatus.OK
