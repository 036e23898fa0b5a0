"""``dksm guests``: name the shipped guest images."""

from __future__ import annotations

import argparse
from typing import Any

from dksm.vmm.exit_status import ExitStatus


def register(sub: Any) -> None:
    parser = sub.add_parser("guests", help="list the shipped guest images")
    gsub = parser.add_subparsers(
        dest="guests_command", required=True, metavar="ACTION", prog="dksm guests"
    )
    lister = gsub.add_parser("list", help="list shipped guests and their image paths")
    lister.set_defaults(handler=_list)
    path = gsub.add_parser("path", help="print the image path of a shipped guest")
    path.add_argument("name")
    path.set_defaults(handler=_path)


def _list(args: argparse.Namespace) -> int:
    from dksm.guests import catalog

    for name, path in catalog().items():
        print(f"{name}\t{path.stat().st_size}\t{path}")
    return ExitStatus.OK


def _path(args: argparse.Namespace) -> int:
    from dksm.guests import guest_path

    print(guest_path(args.name))
    return ExitStatus.OK
