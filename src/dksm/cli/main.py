"""``dksm`` entry point: the argument parser and the error-to-exit-status mapping."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from dksm.error import DksmError
from dksm.vmm.exit_status import ExitStatus

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    import argparse
    import signal
    from typing import Any
else:
    # signal's C half: the same functions and signal numbers, as plain ints.  The
    # signal module itself only wraps them in enums, and importing it (with enum)
    # costs milliseconds of every start.
    import _signal as signal


def _sigterm_as_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


COMMANDS = ("run", "vmm", "guests", "fleet", "cluster", "pool", "bench", "analyze", "demo")


def install_signal_handlers() -> None:
    """SIGTERM ends a dksm command as Ctrl-C does: as an exception in the main thread."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that command's, so that ``dksm run`` does not
    import the modules of every other command (start-up time is a measured product)."""
    import importlib

    from dksm.cli.parsing import Parser

    parser = Parser(
        prog="dksm", description="Daemonless, load-time same-page merging for KVM microVMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", prog="dksm")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"dksm.cli.{name}").register(sub)
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


# What a shell reports for a tool that SIGPIPE ended (`dksm pool stats | head -1`).
_BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (Linux flags its write end with
    POLLERR): only that broken pipe is the reader's doing, any other is a bug."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _silence_stdout() -> None:
    """The reader of stdout went away: send what is still buffered nowhere, so that
    the interpreter's last flush at exit does not fail (and complain) again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    install_signal_handlers()
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["--version"]:
        from dksm import __version__

        print(f"dksm {__version__}")
        return ExitStatus.OK
    if words[:1] == ["vmm"]:  # Firecracker's flags and exit statuses, not dksm's
        from dksm.cli.vmm import run

        return run(words[1:], "dksm vmm")
    args: Any = None
    if words[:1] == ["run"]:  # plain flags are read without argparse (start-up time)
        from dksm.cli.run import plain_arguments

        args = plain_arguments(words[1:])
    if args is None:
        parser = build_parser(words[0] if words and words[0] in COMMANDS else None)
        args = parser.parse_args(words)

    def handle() -> int:
        try:
            _repair_ksm_after_a_crash()
            status: int = args.handler(args)
            sys.stdout.flush()  # here, where a closed pipe can still be told apart
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise
            _silence_stdout()
            return _BROKEN_PIPE_STATUS
        return status

    return said_as_errors(handle)


def said_as_errors(call: Callable[[], int]) -> int:
    """``call()``, with its dksm errors and interruption said on stderr as every
    ``dksm`` command says them, and mapped to their exit statuses."""
    try:
        return call()
    except DksmError as exc:
        # One line per problem (a config document may have several), each escaped so
        # that a path holding a newline cannot split it.
        for line in exc.lines():
            print(f"dksm: error: {line}", file=sys.stderr)
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        print("dksm: interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
