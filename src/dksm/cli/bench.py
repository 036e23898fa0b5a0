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
        default="100,1000,5000,10000",
        metavar="N[,N...]",
        help="pages per process, one run per value (the thesis: 100 to 10,000)",
    )
    merge.add_argument("--methods", default="dksm,ksm", help="methods to compare (dksm,ksm)")
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
    linux = bsub.add_parser(
        "linux",
        help="how much of a Linux kernel stays shared: page states after boot, and why "
        "pages were copied (needs 'dksm guests fetch linux'; boots take minutes)",
    )
    linux.add_argument("--instances", default="1", metavar="N[,N...]", help="fleet sizes")
    linux.add_argument(
        "--modes",
        default="dksm,dksm+merge",
        help="none, dksm, dksm+merge (post-boot merge), ksm, dksm+ksm (comma-separated)",
    )
    linux.add_argument("--boot-args", default=None, help="the kernel command line")
    linux.add_argument("--mem-mib", type=int, default=128, help="guest RAM of each VM")
    linux.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S", help="the longest a fleet may boot"
    )
    linux.add_argument("--pages-to-scan", type=int, default=None, help="ksmd's rate in ksm modes")
    linux.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    linux.add_argument(
        "--console-dir",
        default=None,
        metavar="DIR",
        help="write each VM's console to a log file in DIR as it comes",
    )
    linux.add_argument(
        "--plot", default=None, metavar="FILE", help="plot memory over time per mode (PNG)"
    )
    linux.set_defaults(handler=_linux)


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
    parser.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM (16)")
    parser.add_argument(
        "--vms-per-process", type=int, default=8, metavar="K", help="VMs per worker (8)"
    )
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
    parser.add_argument(
        "--out",
        default="out/demo" if demo else "out/fleet",
        metavar="DIR",
        help="where results and plots go",
    )
    parser.add_argument("--json", action="store_true", help="print summary.json")


DEFAULT_FLEET_IMAGES = ("hello", "idle", "cowprobe")


def run_fleet_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from dksm.bench.fleet import FleetBenchConfig, KsmKnobs, run_fleet_bench, table, write_outputs
    from dksm.fleet.instance import DedupMode

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
    )
    results = run_fleet_bench(cfg)
    summary = write_outputs(cfg, results)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console = Console()
        console.print(table(results))
        console.print(f"series, summary.json and memory.png in {cfg.out_dir}/")
    return ExitStatus.OK


def _ints(text: str, what: str) -> list[int]:
    from dksm.error import DksmError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DksmError(f"{what} must be comma-separated whole numbers, not '{text}'") from None
    if not values or min(values) < 1:
        raise DksmError(f"{what} must be positive whole numbers, not '{text}'")
    return values


def _merge_cost(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from dksm.bench.merge_cost import run_merge_cost

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = run_merge_cost(
        args.processes, _ints(args.pages, "--pages"), Path(args.out), methods=methods
    )
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
    from dksm.bench.boot import measure_boot, median_differences

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
    results = measure_boot(args.guest, args.runs, dedup=args.dedup, flags=flags, variants=variants)
    differences = median_differences(results)
    if args.json:
        docs = [r.to_json() for r in results]
        doc = docs[0] if len(docs) == 1 else {"variants": docs, "differences_ms": differences}
        print(json.dumps(doc, indent=2))
    else:
        print("\n\n".join(r.table() for r in results))
        for name, diff in differences.items():
            print(
                f"{name}: {diff['first_byte']:+.1f} ms to the first byte, "
                f"{diff['exit']:+.1f} ms to exit (medians)"
            )
    return ExitStatus.OK


def _linux(args: argparse.Namespace) -> int:
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from dksm.bench.linux import ModeResult, plot, run_mode
    from dksm.error import DksmError
    from dksm.guests import guest_path, linux
    from dksm.loader.host_file import check_path

    kernel = str(guest_path("linux"))
    initrd = str(guest_path("linux-initrd"))
    settings = {} if args.pages_to_scan is None else {"pages_to_scan": args.pages_to_scan}
    console_dir = None
    if args.console_dir is not None:
        check_path(args.console_dir, "console directory")
        console_dir = Path(args.console_dir)
        if not console_dir.is_dir():
            raise DksmError(f"console directory {console_dir} is not a directory")
    results: list[ModeResult] = []
    docs = []
    for count in _ints(args.instances, "--instances"):
        for mode in args.modes.split(","):
            result = run_mode(
                mode,
                count,
                kernel=kernel,
                initrd=initrd,
                boot_args=linux.BOOT_ARGS if args.boot_args is None else args.boot_args,
                mem_mib=args.mem_mib,
                timeout=args.timeout,
                ksm_settings=settings,
                console_dir=console_dir,
                log=lambda line: print(f"dksm: {line}", file=sys.stderr, flush=True),
            )
            results.append(result)
            docs.append(asdict(result))
            text = json.dumps({"results": docs}, indent=2)
            if args.out:
                Path(args.out).write_text(text + "\n")
            if args.plot:
                plot(results, Path(args.plot))
    print(text)
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
