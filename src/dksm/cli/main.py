"""``dksm`` entry point: the argument parser and the error-to-exit-status mapping."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from dksm.error import DksmError
from dksm.vmm.exit_status import ExitStatus


def _sigterm_as_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    from dksm.cli import analyze, bench, demo, fleet, guests, pool, run

    parser = argparse.ArgumentParser(
        prog="dksm", description="Daemonless, load-time same-page merging for KVM microVMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.register(sub)
    guests.register(sub)
    fleet.register(sub)
    pool.register(sub)
    bench.register(sub)
    analyze.register(sub)
    demo.register(sub)
    return parser


def _repair_ksm_after_a_crash() -> None:
    """A dksm process killed while it had KSM switched on leaves its saved settings
    on disk; whichever dksm command starts next puts them back.  The common case
    (no record) costs one stat()."""
    import os

    path = os.environ.get("DKSM_KSM_STATE") or "/run/dksm/ksm-settings.json"
    if os.path.exists(path):
        from dksm.dedup.ksm import restore_if_crashed

        if restore_if_crashed():
            print("dksm: restored KSM settings left by a dksm process that died", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _repair_ksm_after_a_crash()
        status: int = args.handler(args)
    except DksmError as exc:
        print(f"dksm: error: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        print("dksm: interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
