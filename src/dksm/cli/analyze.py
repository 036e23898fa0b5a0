"""``dksm analyze``: what the page pool would share between guest images, what it would
not, and why."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dksm.vmm.exit_status import ExitStatus


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "analyze",
        help="pages of guest images: what would be shared, what not and why",
        description=(
            "Classify the pages of each image as the loader does, compare images page "
            "by page as the content-addressed pool does, find byte runs two images hold "
            "at shifted addresses, and predict a fleet's guest-image memory under none, "
            "dksm and an ideal KSM."
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="shipped guest name or path")
    parser.add_argument(
        "--instances",
        default="10",
        metavar="N[,N...]",
        help="instances per image for the fleet prediction: one count, or one per image",
    )
    parser.add_argument(
        "--mem-mib",
        type=int,
        default=None,
        help="guest RAM the images are checked against (default: as 'dksm run', 128)",
    )
    parser.add_argument("--top", type=int, default=5, help="rows of regions and symbols to show")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON")
    parser.add_argument(
        "--plot", metavar="FILE", help="write a heatmap of the sharing matrix (PNG)"
    )
    parser.set_defaults(handler=_analyze)


def _counts(text: str) -> list[int]:
    from dksm.analyze.analysis import AnalyzeError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AnalyzeError(
            f"--instances must be comma-separated whole numbers, not '{text}'"
        ) from None
    if not values:
        raise AnalyzeError("--instances needs at least one count")
    return values


def _analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dksm.analyze.analysis import AnalyzeError, analyze_images
    from dksm.analyze.report import plot_matrix, render, to_json
    from dksm.arch import layout
    from dksm.guests import resolve_image
    from dksm.vmm.config import DEFAULT_MEM_MIB

    mem_mib = DEFAULT_MEM_MIB if args.mem_mib is None else args.mem_mib
    if not layout.MIN_MEM_SIZE <= mem_mib * layout.MIB <= layout.MAX_MEM_SIZE:
        raise AnalyzeError(
            f"--mem-mib {mem_mib} is outside what a guest may have "
            f"({layout.MIN_MEM_SIZE // layout.MIB} to {layout.MAX_MEM_SIZE // layout.MIB} MiB)"
        )
    paths = [resolve_image(name) for name in args.images]
    analysis = analyze_images(paths, _counts(args.instances), mem_mib * layout.MIB)
    if args.plot:
        try:
            plot_matrix(analysis, Path(args.plot))
        except OSError as exc:
            raise AnalyzeError(f"cannot write the plot to {args.plot}: {exc.strerror}") from exc
    if args.json:
        print(json.dumps(to_json(analysis, max(args.top, 10)), indent=1))
        return ExitStatus.OK
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped or captured: no terminal width to respect, so do not squeeze tables.
        console = Console(width=max(console.width, 120))
    render(analysis, console, max(args.top, 1))
    if args.plot:
        console.print(f"sharing matrix heatmap in {args.plot}")
    return ExitStatus.OK
