"""``dksm guests``: name the shipped guest images; fetch the Linux guest."""

from __future__ import annotations

import argparse
from typing import Any

from dksm.vmm.exit_status import ExitStatus


def register(sub: Any) -> None:
    parser = sub.add_parser("guests", help="list the guest images; fetch the Linux guest")
    gsub = parser.add_subparsers(
        dest="guests_command", required=True, metavar="ACTION", prog="dksm guests"
    )
    lister = gsub.add_parser(
        "list", help="list the guests (shipped and fetched) and what each does"
    )
    lister.add_argument(
        "--paths", action="store_true", help="print each guest's name and image path instead"
    )
    lister.set_defaults(handler=_list)
    path = gsub.add_parser("path", help="print the image path of a guest")
    path.add_argument("name", help="a shipped or fetched guest's name (see 'dksm guests list')")
    path.set_defaults(handler=_path)
    fetch = gsub.add_parser(
        "fetch",
        help="download Debian's cloud kernel and busybox (apt-get download) into the "
        "per-user cache and build the Linux guest; installs nothing",
    )
    fetch.add_argument("name", choices=["linux"], help="the guest to fetch")
    fetch.add_argument("--refresh", action="store_true", help="fetch again even if cached")
    fetch.set_defaults(handler=_fetch)


def _list(args: argparse.Namespace) -> int:
    from dksm.guests import DESCRIPTIONS, catalog, fetched_catalog

    images = {**catalog(), **fetched_catalog()}
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


def _fetch(args: argparse.Namespace) -> int:
    from dksm.guests.linux import fetch_linux

    fetched, fresh = fetch_linux(refresh=args.refresh)
    verb = "fetched" if fresh else "already cached"
    print(
        f"{verb}: {fetched.kernel_package} {fetched.kernel_version}, busybox-static "
        f"{fetched.busybox_version}"
    )
    print(f"linux\t{fetched.vmlinux}")
    print(f"linux-initrd\t{fetched.initrd}")
    return ExitStatus.OK


def _path(args: argparse.Namespace) -> int:
    from dksm.guests import guest_path

    print(guest_path(args.name))
    return ExitStatus.OK
