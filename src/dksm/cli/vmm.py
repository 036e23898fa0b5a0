"""``dksm vmm`` and ``dksm-firecracker``: a microVM process that takes Firecracker's
process flags and serves Firecracker's API on a Unix socket.

A tool that starts a ``firecracker`` binary by path can be pointed at
``dksm-firecracker``.  Exit statuses are Firecracker's where it defines them (its
``FcExitCode``): 0 when the guest shut down, 1 for a generic error, 152 for a bad
configuration (a config file or log level that cannot be used), 153 for bad
arguments; a VM that ends otherwise exits with ``dksm run``'s status for that end
(3 triple fault, 4 KVM error, 6 VMM bug, 130 SIGINT/SIGTERM).

Threads, as in Firecracker: ``fc_api`` serves the socket; the main thread (``fc_vmm``)
waits for ``InstanceStart``, then for the VM to end, flushing metrics every minute.
The socket, the log and the metrics files are opened before any VM exists.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from dksm.error import DksmError, one_line

DEFAULT_API_SOCK = "/run/firecracker.socket"  # Firecracker's default
# The privileged parent of a confined VMM (see _guarded); its death ends the VMM.
_guardian_pid: int | None = None
DEFAULT_INSTANCE_ID = "anonymous-instance"  # Firecracker's default
INSTANCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what Firecracker's validator allows


class FcExit(enum.IntEnum):
    """Firecracker's exit codes (``FcExitCode``) that dksm's front door uses."""

    OK = 0
    GENERIC_ERROR = 1
    BAD_CONFIGURATION = 152
    ARG_PARSING = 153


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"dksm-firecracker: error: {message}", file=sys.stderr)
        print("For more information try --help.", file=sys.stderr)
        raise SystemExit(FcExit.ARG_PARSING)


# Firecracker flags for features dksm does not have: refused as bad arguments.
UNSUPPORTED_FLAGS = {
    "seccomp_filter": "--seccomp-filter: custom seccomp filters are not supported",
    "metadata": "--metadata: the microVM metadata service (MMDS) is not supported",
    "mmds_size_limit": "--mmds-size-limit: the microVM metadata service (MMDS) is not supported",
    "module": "--module: filtering the log by module is not supported",
    "describe_snapshot": "--describe-snapshot: snapshots are not supported",
    "snapshot_version": "--snapshot-version: snapshots are not supported",
    "enable_pci": "--enable-pci: PCI is not supported (dksm's guests use port I/O)",
}


def build_parser(prog: str = "dksm-firecracker") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="A dksm microVM with Firecracker's process flags and API socket.",
    )
    p.add_argument(
        "--api-sock",
        default=DEFAULT_API_SOCK,
        metavar="PATH",
        help=f"Unix socket the API is served on (default {DEFAULT_API_SOCK}); must not exist",
    )
    p.add_argument(
        "--id",
        default=DEFAULT_INSTANCE_ID,
        help="microVM identifier: 1 to 64 letters, digits and '-' (shown by GET / and logs)",
    )
    p.add_argument(
        "--config-file",
        metavar="JSON",
        help="boot the microVM this Firecracker config file describes, at start",
    )
    p.add_argument(
        "--no-api", action="store_true", help="serve no API socket (needs --config-file)"
    )
    p.add_argument("--log-path", metavar="PATH", help="file or named pipe for the log")
    p.add_argument(
        "--level",
        metavar="LEVEL",
        help="log level: Error, Warning, Info (default), Debug, Trace or Off (any case)",
    )
    p.add_argument("--show-level", action="store_true", help="write each line's level")
    p.add_argument(
        "--show-log-origin", action="store_true", help="write each line's source file and line"
    )
    p.add_argument(
        "--metrics-path", metavar="PATH", help="file or named pipe for the JSON-lines metrics"
    )
    p.add_argument(
        "--boot-timer",
        action="store_true",
        help="log the time from InstanceStart to the guest's first console line",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument(
        "--http-api-max-payload-size",
        type=int,
        default=51200,
        metavar="BYTES",
        help="largest request body the API takes (default 51200)",
    )
    p.add_argument(
        "--no-seccomp",
        action="store_true",
        help="install no seccomp filter (the VMM still gives up its ids and capabilities)",
    )
    from dksm.cli.run import add_confinement_options

    add_confinement_options(p)
    for name in ("start-time-us", "start-time-cpu-us", "parent-cpu-time-us"):
        p.add_argument(f"--{name}", type=int, metavar="US", help="process start time, for metrics")
    for flag, takes_value in (
        ("--seccomp-filter", True),
        ("--metadata", True),
        ("--mmds-size-limit", True),
        ("--module", True),
        ("--describe-snapshot", True),
        ("--snapshot-version", False),
        ("--enable-pci", False),
    ):
        if takes_value:
            p.add_argument(flag, metavar="X", help="not supported by dksm (refused)")
        else:
            p.add_argument(flag, action="store_true", help="not supported by dksm (refused)")
    return p


def firecracker_main(argv: Sequence[str] | None = None) -> int:
    """The ``dksm-firecracker`` console script."""
    from dksm.cli.main import install_signal_handlers

    install_signal_handlers()
    return run(list(sys.argv[1:] if argv is None else argv))


def _interrupted() -> int:
    from dksm.vmm.exit_status import ExitStatus

    print("dksm-firecracker: interrupted", file=sys.stderr)
    return int(ExitStatus.INTERRUPTED)


def run(argv: list[str], prog: str = "dksm-firecracker") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.version:
        from dksm import __version__

        print(f"dksm v{__version__} (Firecracker-compatible front door)\n")
        return FcExit.OK
    for name, message in UNSUPPORTED_FLAGS.items():
        if getattr(args, name) not in (None, False):
            return _fail(message, FcExit.ARG_PARSING)
    if not INSTANCE_ID.match(args.id):
        return _fail(f"--id {args.id!r}: 1 to 64 letters, digits and '-' only", FcExit.ARG_PARSING)
    if args.no_api and not args.config_file:
        return _fail("--no-api requires --config-file", FcExit.ARG_PARSING)
    if args.http_api_max_payload_size < 1:
        return _fail("--http-api-max-payload-size must be positive", FcExit.ARG_PARSING)
    if not args.no_api and not args.no_confine:
        return _guarded(args)
    return _run_vmm(args)


def _run_vmm(args: argparse.Namespace) -> int:
    try:
        return _VmmProcess(args).run()
    except KeyboardInterrupt:  # SIGINT/SIGTERM before the VMM thread waits (or after)
        return _interrupted()


def _guarded(args: argparse.Namespace) -> int:
    """Run the VMM in a child and remove its API socket once it has ended.

    A confined VMM may no longer remove the socket file it created (it is another
    user by then, and its filter allows no unlink), so the process the client started
    stays privileged for that one job, as a jailer does: it forwards SIGTERM and
    SIGINT to the VMM, waits, removes the socket if the VMM made it, and exits with
    the VMM's status."""
    import signal
    import stat

    existed = os.path.lexists(args.api_sock)
    pid = os.fork()
    if pid == 0:
        global _guardian_pid
        _guardian_pid = os.getppid()
        status = 1
        try:
            status = _run_vmm(args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    _, wait_status = os.waitpid(pid, 0)
    if not existed:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(args.api_sock).st_mode):
                os.unlink(args.api_sock)
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _confinement(args: argparse.Namespace) -> Any:
    """What the VMM gives up once its VM is built (None with --no-confine); prepared
    now, while the process can still load libseccomp and the emulation fallback."""
    from dksm.cli.run import confinement_credentials

    target = confinement_credentials(args)
    if target is None:
        return None
    from dksm.vmm.confinement import Confinement
    from dksm.vmm.seccomp_filter import API_SERVER_RULES

    confinement = Confinement(target, extra_rules=API_SERVER_RULES, seccomp=not args.no_seccomp)
    confinement.prepare()
    return confinement


def _fail(message: str | DksmError, status: FcExit) -> int:
    """One line per problem, escaped (a DksmError knows its lines)."""
    lines = message.lines() if isinstance(message, DksmError) else [one_line(message)]
    for line in lines:
        print(f"dksm-firecracker: error: {line}", file=sys.stderr)
    return int(status)


class _VmmProcess:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started_ns = time.monotonic_ns()

    def run(self) -> int:
        from dksm.api.controller import ApiError, VmmController
        from dksm.api.logger import VmmLog
        from dksm.api.metrics import Metrics
        from dksm.error import DksmError
        from dksm.vmm.config import ConfigError, from_firecracker_json
        from dksm.vmm.machine import install_kick_handler
        from dksm.vmm.schema import Logger

        args = self.args
        threading.current_thread().name = "fc_vmm"
        # The VM is started from the API thread, but only the main thread may install
        # the handler that lets the kick signal interrupt KVM_RUN (and not the process).
        install_kick_handler()
        log = VmmLog(args.id)
        level = None
        if args.level is not None:
            try:
                level = Logger.model_validate({"level": args.level}).level
            except ValueError:
                return _fail(
                    f"--level {args.level}: use Error, Warning, Info, Debug, Trace or Off",
                    FcExit.BAD_CONFIGURATION,
                )
        metrics = Metrics()
        try:
            log.configure(
                path=args.log_path,
                level=level,
                show_level=args.show_level or None,
                show_origin=args.show_log_origin or None,
            )
            if args.metrics_path:
                metrics.open(args.metrics_path)
        except DksmError as exc:
            return _fail(exc, FcExit.GENERIC_ERROR)
        self._startup_metrics(metrics)
        from dksm import __version__

        log.info(f"Running dksm v{__version__} (Firecracker-compatible front door)")
        controller = VmmController(
            args.id,
            log,
            metrics,
            boot_timer=args.boot_timer,
            console_input_fd=0,
            confinement=_confinement(args),
        )
        server = None
        try:
            if args.config_file:
                try:
                    accepted = from_firecracker_json(args.config_file)
                    controller.apply_document(accepted.document)
                except (ConfigError, ApiError) as exc:
                    log.error(f"Configuration for VMM from one single json failed: {exc}")
                    return _fail(exc, FcExit.BAD_CONFIGURATION)
            if not args.no_api:
                server = self._serve(controller, log, args.api_sock, args.http_api_max_payload_size)
            if args.config_file:
                try:
                    controller.start()
                except DksmError as exc:
                    log.error(f"Building VMM configured from cmdline json failed: {exc}")
                    return _fail(exc, FcExit.BAD_CONFIGURATION)
            return self._wait(controller, metrics, log)
        except DksmError as exc:
            return _fail(exc, FcExit.GENERIC_ERROR)
        finally:
            if server is not None:
                server.stop()
            controller.close()
            metrics.close()
            log.close()

    @staticmethod
    def _serve(controller: Any, log: Any, path: str, max_payload: int) -> Any:
        import json

        from dksm.api import routes
        from dksm.api.http_server import ApiServer

        def handle(method: str, path: str, body: bytes) -> tuple[int, bytes]:
            log.info(f'The API server received a {method} request on "{path}".')
            answer = routes.dispatch(controller, method, path, body)
            if answer.status >= 400 and answer.body is not None:
                log.warning(f"{method} {path}: {answer.body.get('fault_message', '')}")
            payload = b"" if answer.body is None else json.dumps(answer.body).encode()
            return answer.status, payload

        server = ApiServer(path, handle, max_payload=max_payload)
        server.start()
        return server

    def _startup_metrics(self, metrics: Any) -> None:
        args = self.args
        now_us = time.time_ns() // 1000
        if args.start_time_us is not None:
            metrics.counters.set_total(
                "api_server", "process_startup_time_us", now_us - args.start_time_us
            )
        if args.start_time_cpu_us is not None:
            cpu_us = time.process_time_ns() // 1000
            metrics.counters.set_total(
                "api_server", "process_startup_time_cpu_us", cpu_us - args.start_time_cpu_us
            )

    def _wait(self, controller: Any, metrics: Any, log: Any) -> int:
        """The VMM thread: wait for InstanceStart, then for the VM to end."""
        from dksm.api.metrics import FLUSH_PERIOD_S
        from dksm.vmm.exit_status import CAUSE_STATUS, ExitStatus
        from dksm.vmm.machine import ExitCause

        next_flush = time.monotonic() + FLUSH_PERIOD_S
        try:
            while True:
                if _guardian_pid is not None and os.getppid() != _guardian_pid:
                    # Killed outright, the process the client started cannot pass the
                    # signal on; the death-signal setting does not survive setuid.
                    raise KeyboardInterrupt
                if controller.started.wait(0.5):
                    vm = controller.instance.vm
                    if vm.wait(0.5):
                        break
                    if vm.finished:  # ended from inside: make sure every vCPU heard it
                        for thread in vm.threads:
                            thread.kick()
                if time.monotonic() >= next_flush:
                    metrics.flush()
                    next_flush += FLUSH_PERIOD_S
        except KeyboardInterrupt:
            log.info("Shutting down on SIGINT/SIGTERM")
            if controller.instance is not None:
                controller.instance.vm.stop(ExitCause.INTERRUPTED, "SIGINT or SIGTERM")
            metrics.flush()
            return int(ExitStatus.INTERRUPTED)
        outcome = vm.outcome
        assert outcome is not None
        metrics.flush()
        status = int(CAUSE_STATUS[outcome.cause])
        if status == ExitStatus.OK:
            log.info(f"Firecracker-compatible VMM exiting successfully: {outcome.describe()}")
        else:
            log.error(f"The microVM ended: {outcome.describe()}")
            print(f"dksm-firecracker: {outcome.describe()}", file=sys.stderr)
        return status


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "vmm",
        help="one microVM with Firecracker's flags and API socket (as dksm-firecracker)",
        add_help=False,
    )
    parser.add_argument("firecracker_args", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=lambda args: run(args.firecracker_args, "dksm vmm"))
