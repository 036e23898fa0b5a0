"""``dksm pool``: inspect and control the page pool of a sharing domain."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from dksm.vmm.exit_status import ExitStatus


def register(sub: Any) -> None:
    parser = sub.add_parser("pool", help="the page pool of a sharing domain")
    psub = parser.add_subparsers(
        dest="pool_command", required=True, metavar="ACTION", prog="dksm pool"
    )
    actions = {
        "stats": ("counters of a domain's pool (the DKSM thesis's names)", _stats),
        "sweep": ("release the leases of dead processes now", _sweep),
        "enable": ("merge pages at load time (the run switch on)", _enable),
        "disable": ("copy pages at load time (existing mappings stay)", _disable),
        "verify": ("check a domain's pool for damage (exit 1 listing the problems)", _verify),
        "purge": ("remove a domain's pool (refused while VMs use it)", _purge),
    }
    for name, (text, handler) in actions.items():
        action = psub.add_parser(name, help=text)
        action.add_argument("--domain", default="default", help="the sharing domain ('default')")
        action.add_argument(
            "--pool-root", default=None, metavar="DIR", help="the pool root, on tmpfs"
        )
        if name == "stats":
            action.add_argument("--json", action="store_true", help="print the counters as JSON")
        if name == "purge":
            action.add_argument(
                "--force",
                action="store_true",
                help="also a damaged pool, without reading its index (never one in use)",
            )
        action.set_defaults(handler=handler)


def _existing_pool(args: argparse.Namespace, *, sweep: bool = True) -> Any:
    from dksm.dedup.pool import PagePool

    return PagePool.open(args.domain, args.pool_root, sweep=sweep, create=False)


def _stats(args: argparse.Namespace) -> int:
    with contextlib.closing(_existing_pool(args)) as pool:
        stats = pool.stats().to_json()
    if args.json:
        print(json.dumps({"domain": args.domain, **stats}, indent=2))
        return ExitStatus.OK
    print(f"pool of domain '{args.domain}'")
    for key, value in stats.items():
        print(f"  {key:<20} {value}")
    return ExitStatus.OK


def _sweep(args: argparse.Namespace) -> int:
    with contextlib.closing(_existing_pool(args, sweep=False)) as pool:
        swept = pool.sweep()
    print(f"swept {swept} lease(s) of dead processes from domain '{args.domain}'")
    return ExitStatus.OK


def _set_run(args: argparse.Namespace, run: bool) -> int:
    from dksm.dedup.pool import PagePool

    with contextlib.closing(PagePool.open(args.domain, args.pool_root)) as pool:
        pool.set_run(run)
    print(f"merging {'enabled' if run else 'disabled'} for domain '{args.domain}'")
    return ExitStatus.OK


def _enable(args: argparse.Namespace) -> int:
    return _set_run(args, True)


def _disable(args: argparse.Namespace) -> int:
    return _set_run(args, False)


def _verify(args: argparse.Namespace) -> int:
    from dksm.dedup.pool import PoolDamagedError

    try:
        with contextlib.closing(_existing_pool(args, sweep=False)) as pool:
            problems = pool.verify()
    except PoolDamagedError as damage:  # too damaged to open: that is the problem
        problems = [str(damage)]
    if not problems:
        print(f"the pool of domain '{args.domain}' is consistent")
        return ExitStatus.OK
    print(f"the pool of domain '{args.domain}' has {len(problems)} problem(s):")
    for problem in problems:
        print(f"  {problem}")
    return ExitStatus.ERROR


def _purge(args: argparse.Namespace) -> int:
    if args.force:
        from dksm.dedup.pool import force_purge

        left = force_purge(args.domain, args.pool_root)
    else:
        pool = _existing_pool(args)
        try:
            left = pool.purge()
        finally:
            pool.close()
    print(f"purged the pool of domain '{args.domain}'")
    if left:
        print(f"  left what dksm did not make: {', '.join(left)}")
    return ExitStatus.OK
