"""``dksm bench``: the project's measurements."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dksm.cli.bench_fleets import (
    add_duplicates_options,
    add_fleet_options,
    add_runtime_options,
    ints,
    run_duplicates,
    run_fleet_command,
    run_runtime,
)
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
    boot.add_argument(
        "--keep-image-leased",
        action="store_true",
        help="also time each variant with the image held in the page pool by this process"
        " (a known image: its manifest path) beside the first loads",
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
    fleet.set_defaults(handler=run_fleet_command)
    runtime = bsub.add_parser(
        "runtime",
        help="run time of a compute-bound guest beside a background fleet, per dedup mode "
        "and CPU placement (the thesis's: does ksmd slow guests down?)",
    )
    add_runtime_options(runtime)
    runtime.set_defaults(handler=run_runtime)
    duplicates = bsub.add_parser(
        "duplicates",
        help="memory as one more instance of every image starts per step, per dedup mode",
    )
    add_duplicates_options(duplicates)
    duplicates.set_defaults(handler=run_duplicates)
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
        return ints(text, "--pages")
    parts = text.split(":")
    if len(parts) != 3:
        raise DksmError(f"--pages ranges are FIRST:LAST:STEP, not '{text}'")
    first, last, step = (ints(part, "--pages")[0] for part in parts)
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
        ints(args.sizes, "--sizes"),
        ints(args.vms_per_process, "--vms-per-process"),
        args.mem_mib,
    )
    if args.json:
        print(json.dumps(to_json(rows), indent=2))
    else:
        Console().print(table(rows))
    return ExitStatus.OK


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
    measured = measure_boot(
        args.guest,
        args.runs,
        dedup=args.dedup,
        flags=flags,
        variants=variants,
        keep_image_leased=args.keep_image_leased,
    )
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
        if measured.manifest_pages_per_known_run is not None:
            doc["manifest_pages_per_known_run"] = measured.manifest_pages_per_known_run
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
        if measured.manifest_pages_per_known_run is not None:
            print(
                "pages each known-image run took through the image's manifest:"
                f" {measured.manifest_pages_per_known_run:g}"
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
    for count in ints(args.instances, "--instances"):
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
