"""``dksm bench``: the project's measurements."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dksm.vmm.exit_status import ExitStatus


def register(sub: Any) -> None:
    parser = sub.add_parser("bench", help="run a benchmark")
    bsub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    boot = bsub.add_parser("boot", help="time from process start to first serial byte and exit")
    boot.add_argument("--guest", default="hello", help="shipped guest name or image path")
    boot.add_argument("--runs", type=int, default=20)
    boot.add_argument("--json", action="store_true", help="print the result as JSON")
    boot.set_defaults(handler=_boot)


def _boot(args: argparse.Namespace) -> int:
    from dksm.bench.boot import measure_boot

    result = measure_boot(args.guest, args.runs)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(result.table())
    return ExitStatus.OK
