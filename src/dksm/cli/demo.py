"""``dksm demo``: the main job.  The fleet experiment on the shipped guests with
defaults that finish in about two minutes on a 2-core machine."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    from dksm.cli.bench_fleets import add_fleet_options

    parser = sub.add_parser("demo", help="the fleet experiment on the shipped guests (~2 min)")
    add_fleet_options(parser, demo=True)
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from dksm.cli.bench_fleets import run_fleet_command

    return run_fleet_command(args)
