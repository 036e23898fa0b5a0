"""``dksm run``: boot one microVM from flags or a Firecracker config file."""

from __future__ import annotations

import gc
import os
import sys
from types import SimpleNamespace

from dksm.cli import run_options
from dksm.error import DksmError
from dksm.vmm.exit_status import ExitStatus, status_for

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    import argparse
    from typing import Any

    # What argparse makes of the flags, or plain_arguments.
    Arguments = argparse.Namespace | SimpleNamespace

    from dksm.vmm.confinement import Credentials

_INFINITY = float("inf")  # math's, without loading the math extension for one constant


class SerialOutputError(DksmError):
    """The serial output file cannot be opened."""


def register(sub: Any) -> None:
    parser = sub.add_parser("run", help="boot one microVM and run it until it exits")
    source = parser.add_mutually_exclusive_group(required=True)
    for option in run_options.SOURCES:
        option.add_to(source)
    for option in run_options.MACHINE:
        option.add_to(parser)
    add_confinement_options(parser)
    parser.set_defaults(handler=handle)


def plain_arguments(words: list[str]) -> SimpleNamespace | None:
    """What ``dksm run WORDS`` means, read without argparse when the words are plain
    (:func:`dksm.cli.run_options.read_plainly`); None when argparse must read them."""
    values = run_options.read_plainly(words)
    if values is None:
        return None
    return SimpleNamespace(command="run", handler=handle, **values)


def add_confinement_options(parser: argparse.ArgumentParser) -> None:
    for option in run_options.CONFINEMENT:
        option.add_to(parser)


def confinement_credentials(args: Arguments) -> Credentials | None:
    """Who the VMM becomes once built, or None when confinement is turned off."""
    if args.no_confine:
        if args.uid is not None or args.gid is not None:
            raise DksmError("--uid and --gid confine the VMM; they cannot go with --no-confine")
        return None
    from dksm.vmm.confinement import credentials

    return credentials(args.uid, args.gid)


def _config(args: Arguments) -> tuple[Any, Any]:
    """The VM config and, with --config-file, the file it came from (else None)."""
    from dksm.guests import resolve_image_path, resolve_initrd_path
    from dksm.loader.host_file import check_path
    from dksm.vmm.config import DEFAULT_BOOT_ARGS, DEFAULT_MEM_MIB, VmConfig

    if args.initrd is not None:
        check_path(args.initrd, "initrd")  # the builder takes an empty path for none
    if args.info_file is not None:
        check_path(args.info_file, "info file")  # before a VM is built for nothing
    if args.config_file is not None:
        from dksm.vmm.config import FRONT_DOOR_SECTIONS, from_firecracker_json

        config_file = from_firecracker_json(args.config_file, refuse=FRONT_DOOR_SECTIONS)
        config = config_file.vm
        overrides: dict[str, Any] = {
            k: v
            for k, v in (
                ("mem_mib", args.mem_mib),
                ("vcpu_count", args.vcpus),
                ("boot_args", args.boot_args),
                ("initrd_path", None if args.initrd is None else resolve_initrd_path(args.initrd)),
            )
            if v is not None
        }
        if args.no_tsc_leaf:
            overrides["tsc_frequency_leaf"] = False
        if overrides:
            config = config.replace(**overrides)
        config.validate()
        return config, config_file
    config = VmConfig(
        kernel_path=resolve_image_path(args.kernel),
        boot_args=DEFAULT_BOOT_ARGS if args.boot_args is None else args.boot_args,
        mem_mib=DEFAULT_MEM_MIB if args.mem_mib is None else args.mem_mib,
        vcpu_count=1 if args.vcpus is None else args.vcpus,
        initrd_path=None if args.initrd is None else resolve_initrd_path(args.initrd),
        tsc_frequency_leaf=not args.no_tsc_leaf,
    )
    config.validate()
    return config, None


def _serial_sink(path: str | None) -> Any:
    """Unbuffered: guest output appears as it is written and survives a crash."""
    from dksm.vmm.console_output import open_console_output

    return open_console_output(path)


def _path(text: str) -> Any:
    from dksm.dedup.pool import pool_root  # only when a pool root is given

    return pool_root(text)  # refuses "" (which Path would make the current directory)


def _first(*values: Any) -> Any:
    """The first value that is given (not None)."""
    return next((v for v in values if v is not None), None)


class StartUp:
    """The cyclic garbage collector held off while ``dksm run`` starts its VM.

    What start-up makes (modules, classes, functions, the VM's own objects) lives as
    long as the process, and the collector would walk all of it again and again
    before the guest's first byte (about twenty collections, 3 ms).  It is off from
    :func:`handle` on; once the VM is built and confined, :meth:`over` moves what
    exists then out of the collector's sight for good (:func:`gc.freeze`: the odd
    start-up cycle is kept rather than collected) and turns it back on, for the
    life of the VM."""

    def __init__(self) -> None:
        self.collecting = gc.isenabled()
        gc.disable()

    def over(self) -> None:
        if self.collecting and not gc.isenabled():
            gc.freeze()
            gc.enable()


def handle(args: Arguments) -> int:
    start_up = StartUp()
    try:
        return _handle(args, start_up)
    finally:
        start_up.over()  # a failed start too


def _handle(args: Arguments, start_up: StartUp) -> int:
    if args.timeout is not None and not 0 < args.timeout < _INFINITY:
        raise DksmError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    config, config_file = _config(args)
    target = confinement_credentials(args)
    if target is not None and config.vsock is not None:
        # The vsock device's socket file outlives what the confined VMM may remove.
        from dksm.cli.guardian import run_guarded
        from dksm.cli.main import said_as_errors

        return run_guarded(
            lambda: said_as_errors(lambda: _run(args, config, config_file, target, start_up))
        )
    return _run(args, config, config_file, target, start_up)


def _run(args: Arguments, config: Any, config_file: Any, target: Any, start_up: StartUp) -> int:
    from dksm.fleet.instance import DEFAULT_DOMAIN, DedupMode, Instance, InstanceSpec
    from dksm.vmm.console_input import ConsoleInput

    # A flag given wins over the file's "dksm" object, which wins over the defaults.
    dedup = _first(args.dedup, config_file and config_file.dedup, DedupMode.DKSM.value)
    domain = _first(args.domain, config_file and config_file.domain, DEFAULT_DOMAIN)
    pool_root = _first(args.pool_root, config_file and config_file.pool_root)
    spec = InstanceSpec(
        config=config,
        dedup=DedupMode.parse(dedup),
        domain=domain,
        pool_root=None if pool_root is None else _path(pool_root),
    )
    serial_out = _first(args.serial_out, config_file and config_file.serial_out_path)
    if sys.stdout is not None:
        sys.stdout.flush()
    merge_after = None if args.merge_after is None else os.fsencode(args.merge_after)
    with (
        _serial_sink(serial_out) as sink,
        Instance(spec, sink, merge_after=merge_after) as instance,
    ):
        sink.abandon = lambda: instance.vm.finished  # a stopping VM waits for no reader
        if args.info_file is not None:
            instance.write_info(args.info_file)
        # The guest's COM1 reads what dksm reads, as Firecracker forwards its stdin
        # (the terminal is switched to character mode before the filter is on, the
        # reader thread started after, so that it gives up what the process does).
        with ConsoleInput(sys.stdin.fileno(), instance.vm.serial) as console:
            if target is not None:
                from dksm.vmm.confinement import Confinement
                from dksm.vmm.device_manager import device_kinds

                # From here on, no new file and no privilege.
                Confinement(target).apply(devices=device_kinds(config))
            console.start()
            start_up.over()
            outcome = instance.run(timeout=args.timeout)
    status = status_for(outcome.cause)
    if status != ExitStatus.OK:
        # Exit status 1 is bad input or environment, said the same way as any other.
        error = "error: " if status == ExitStatus.ERROR else ""
        print(f"dksm: {error}{outcome.describe()}", file=sys.stderr)
        if args.verbose and outcome.registers:
            print(outcome.registers, file=sys.stderr)
    if args.verbose:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(outcome.exits.items())) or "none"
        print(f"dksm: non-IO exits: {counts}", file=sys.stderr)
        emulated = sorted(outcome.emulated.items(), key=lambda kv: (-kv[1], kv[0]))
        total = sum(n for _, n in emulated)
        shown = ", ".join(f"{name}={n}" for name, n in emulated) or "none"
        print(f"dksm: instructions emulated in user space: {total} ({shown})", file=sys.stderr)
    if args.merge_after is not None:
        merge = instance.boot_merge.result if instance.boot_merge else None
        if merge is None:
            print("dksm: post-boot merge: its text never appeared", file=sys.stderr)
        else:
            print(
                f"dksm: post-boot merge at {merge.at_s:.1f} s: {merge.copied} copied kernel "
                f"pages back in the pool ({merge.merged} found there, {merge.stored} new) "
                f"in {merge.cpu_s * 1000:.0f} ms of CPU",
                file=sys.stderr,
            )
    return status
