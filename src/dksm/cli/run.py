"""``dksm run``: boot one microVM from flags or a Firecracker config file."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, BinaryIO

from dksm.error import DksmError
from dksm.vmm.exit_status import CAUSE_STATUS, ExitStatus


class SerialOutputError(DksmError):
    """The serial output file cannot be opened."""


def register(sub: Any) -> None:
    parser = sub.add_parser("run", help="boot one microVM and run it until it exits")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--kernel", metavar="IMAGE", help="kernel image (ELF) or shipped guest name"
    )
    source.add_argument("--config-file", metavar="JSON", help="a Firecracker config file")
    parser.add_argument("--mem-mib", type=int, default=None, help="guest RAM in MiB (default 128)")
    parser.add_argument(
        "--vcpus", type=int, default=None, help="number of vCPUs, 1 to 32 (default 1)"
    )
    parser.add_argument("--boot-args", default=None, help="kernel command line")
    parser.add_argument(
        "--initrd", default=None, help="initial ramdisk to load (a file, or linux-initrd)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop the VM after S seconds (exit status 5)",
    )
    parser.add_argument("--serial-out", metavar="FILE", help="write the serial console to FILE")
    parser.add_argument(
        "--no-tsc-leaf",
        action="store_true",
        help="do not announce the TSC frequency in CPUID 0x40000010 (guests calibrate it)",
    )
    parser.add_argument(
        "--dedup", default="dksm", metavar="MODE", help="none, ksm, dksm (default) or dksm+ksm"
    )
    parser.add_argument("--domain", default="default", help="page-pool sharing domain")
    parser.add_argument(
        "--pool-root", default=None, metavar="DIR", help="page-pool directory on tmpfs"
    )
    parser.add_argument(
        "--info-file", metavar="FILE", help="write the VM's pid and RAM address here once built"
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="print registers on faults and exit statistics"
    )
    parser.set_defaults(handler=handle)


def _config(args: argparse.Namespace) -> Any:
    from dksm.guests import resolve_image_path
    from dksm.vmm.config import DEFAULT_BOOT_ARGS, DEFAULT_MEM_MIB, VmConfig, from_firecracker_json

    if args.config_file:
        config = from_firecracker_json(args.config_file)
        overrides: dict[str, Any] = {
            k: v
            for k, v in (
                ("mem_mib", args.mem_mib),
                ("vcpu_count", args.vcpus),
                ("boot_args", args.boot_args),
                ("initrd_path", None if args.initrd is None else resolve_image_path(args.initrd)),
            )
            if v is not None
        }
        if args.no_tsc_leaf:
            overrides["tsc_frequency_leaf"] = False
        if overrides:
            from dataclasses import replace

            config = replace(config, **overrides)
    else:
        config = VmConfig(
            kernel_path=resolve_image_path(args.kernel),
            boot_args=DEFAULT_BOOT_ARGS if args.boot_args is None else args.boot_args,
            mem_mib=DEFAULT_MEM_MIB if args.mem_mib is None else args.mem_mib,
            vcpu_count=1 if args.vcpus is None else args.vcpus,
            initrd_path=None if args.initrd is None else resolve_image_path(args.initrd),
            tsc_frequency_leaf=not args.no_tsc_leaf,
        )
    config.validate()
    return config


def _serial_sink(path: str | None) -> BinaryIO:
    """Unbuffered: guest output appears as it is written and survives a crash."""
    if path is None:
        return os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    try:
        return open(path, "wb", buffering=0)
    except OSError as exc:
        raise SerialOutputError(f"cannot open serial output {path}: {exc.strerror}") from exc


def _path(text: str) -> Any:
    from dksm.dedup.pool import pool_root  # only when a pool root is given

    return pool_root(text)  # refuses "" (which Path would make the current directory)


def handle(args: argparse.Namespace) -> int:
    from dksm.fleet.instance import DedupMode, Instance, InstanceSpec
    from dksm.vmm.console_input import ConsoleInput

    if args.timeout is not None and args.timeout <= 0:
        raise DksmError(f"--timeout must be positive, not {args.timeout:g}")
    config = _config(args)
    spec = InstanceSpec(
        config=config,
        dedup=DedupMode.parse(args.dedup),
        domain=args.domain,
        pool_root=None if args.pool_root is None else _path(args.pool_root),
    )
    sys.stdout.flush()
    with _serial_sink(args.serial_out) as sink, Instance(spec, sink) as instance:
        if args.info_file:
            instance.write_info(args.info_file)
        # The guest's COM1 reads what dksm reads, as Firecracker forwards its stdin.
        with ConsoleInput(sys.stdin.fileno(), instance.vm.serial):
            outcome = instance.run(timeout=args.timeout)
    status = CAUSE_STATUS[outcome.cause]
    if status != ExitStatus.OK:
        print(f"dksm: {outcome.describe()}", file=sys.stderr)
        if args.verbose and outcome.registers:
            print(outcome.registers, file=sys.stderr)
    if args.verbose:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(outcome.exits.items())) or "none"
        print(f"dksm: non-IO exits: {counts}", file=sys.stderr)
        emulated = sorted(outcome.emulated.items(), key=lambda kv: (-kv[1], kv[0]))
        total = sum(n for _, n in emulated)
        shown = ", ".join(f"{name}={n}" for name, n in emulated) or "none"
        print(f"dksm: instructions emulated in user space: {total} ({shown})", file=sys.stderr)
    return status
