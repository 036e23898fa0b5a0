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
    lister = gsub.add_parser("list", help="list the shipped guests and what each does")
    lister.add_argument(
        "--paths", action="store_true", help="print each guest's name and image path instead"
    )
    lister.set_defaults(handler=_list)
    path = gsub.add_parser("path", help="print the image path of a shipped guest")
    path.add_argument("name", help="a shipped guest's name (see 'dksm guests list')")
    path.set_defaults(handler=_path)


def _list(args: argparse.Namespace) -> int:
    from dksm.guests import DESCRIPTIONS, catalog

    images = catalog()
    if args.paths:
        for name, path in images.items():
            print(f"{name}\t{path}")
        return ExitStatus.OK
    width = max((len(name) for name in images), default=5)
    print(f"{'guest':<{width}}  {'size':>8}  what it does")
    for name, path in images.items():
        size = f"{path.stat().st_size // 1024} KiB"
        print(f"{name:<{width}}  {size:>8}  {DESCRIPTIONS.get(name, '')}")
    return ExitStatus.OK


def _path(args: argparse.Namespace) -> int:
    from dksm.guests import guest_path

    print(guest_path(args.name))
    return ExitStatus.OK
