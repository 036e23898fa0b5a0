"""``dksm fleet``: start, inspect and stop many microVMs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from dksm.vmm.exit_status import ExitStatus

MIB = 1 << 20


def add_instance_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mem-mib", type=int, default=None, help="guest RAM per VM in MiB (default 128, as run)"
    )
    parser.add_argument("--vcpus", type=int, default=None, help="vCPUs per VM, 1 to 32 (1)")
    parser.add_argument(
        "--dedup",
        default=None,
        help="none, ksm, dksm or dksm+ksm (default: the config file's, else dksm)",
    )
    parser.add_argument(
        "--domain", default=None, help="page-pool sharing domain (default 'default')"
    )
    parser.add_argument(
        "--pool-root", default=None, metavar="DIR", help="page-pool directory (on tmpfs)"
    )


def register(sub: Any) -> None:
    parser = sub.add_parser("fleet", help="run many microVMs")
    fsub = parser.add_subparsers(
        dest="fleet_command", required=True, metavar="ACTION", prog="dksm fleet"
    )
    up = fsub.add_parser("up", help="start N VMs and return once all booted")
    up.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="shipped guest name or image path (repeatable)",
    )
    up.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="JSON",
        help="a Firecracker config file: its kernel, boot args, machine and dksm settings"
        " (repeatable)",
    )
    up.add_argument("--instances", type=int, default=1, help="VMs per image or config file (1)")
    up.add_argument(
        "--boot-args", default=None, help="kernel command line of every VM (default Firecracker's)"
    )
    up.add_argument(
        "--boot-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for every VM's first console line (120)",
    )
    up.add_argument(
        "--vms-per-process",
        type=int,
        default=8,
        metavar="K",
        help="VMs hosted per worker process (8); 1 gives each VM a process of its own",
    )
    up.add_argument(
        "--hold",
        action="store_true",
        help="keep each VM whose guest shuts down in memory, as it ended, until 'fleet down'"
        " (to measure run-to-completion guests as a standing fleet)",
    )
    add_instance_options(up)
    from dksm.cli.run import add_confinement_options

    add_confinement_options(up)
    up.set_defaults(handler=_up)
    fleet_id_help = "fleet id (default: the newest running fleet, else the newest)"
    status = fsub.add_parser("status", help="list a fleet's VMs")
    status.add_argument("id", nargs="?", help=fleet_id_help)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)
    lister = fsub.add_parser("list", help="list the fleets on record")
    lister.set_defaults(handler=_list)
    prune = fsub.add_parser("prune", help="remove the records of fleets that have stopped")
    prune.set_defaults(handler=_prune)
    down = fsub.add_parser("down", help="stop a fleet's VMs and release their pages")
    down.add_argument("id", nargs="?", help=fleet_id_help)
    down.set_defaults(handler=_down)
    logs = fsub.add_parser("logs", help="print one VM's console output")
    logs.add_argument(
        "where",
        nargs="+",
        metavar="[ID] VM",
        help="VM index, after a fleet id (default fleet: the newest running, else newest)",
    )
    logs.set_defaults(handler=_logs)
    supervise = fsub.add_parser("supervise")  # internal: the fleet's supervisor process
    supervise.add_argument("directory", help="the fleet's directory")
    supervise.set_defaults(handler=_supervise)


def instance_specs(
    images: list[str],
    instances: int,
    mem_mib: int | None,
    dedup: str | None,
    domain: str | None,
    pool_root: str | None,
    boot_args: str | None = None,
    config_files: list[str] | None = None,
    vcpus: int | None = None,
) -> list[tuple[str, Any]]:
    """The fleet's VMs: ``instances`` of each image and each config file.  Flags
    given win over a config file's values (and its "dksm" object)."""

    from dksm.dedup.pool import pool_root as checked_pool_root
    from dksm.error import DksmError
    from dksm.fleet.instance import DEFAULT_DOMAIN, DedupMode, InstanceSpec
    from dksm.guests import resolve_image
    from dksm.loader.elf import load_elf
    from dksm.vmm import device_manager
    from dksm.vmm.config import (
        DEFAULT_BOOT_ARGS,
        DEFAULT_MEM_MIB,
        FLEET_REFUSED_SECTIONS,
        VmConfig,
        from_firecracker_json,
    )

    if instances < 1:
        raise DksmError(f"--instances must be at least 1, not {instances}")
    if not images and not config_files:
        raise DksmError("a fleet needs at least one --image or --config-file")
    # (config, dedup, domain, pool root), before the flags' defaults apply
    kinds: list[tuple[VmConfig, str | None, str | None, str | None]] = [
        (
            VmConfig(
                kernel_path=str(resolve_image(image)),
                mem_mib=DEFAULT_MEM_MIB if mem_mib is None else mem_mib,
                vcpu_count=1 if vcpus is None else vcpus,
                boot_args=DEFAULT_BOOT_ARGS if boot_args is None else boot_args,
            ),
            None,
            None,
            None,
        )
        for image in images
    ]
    for path in config_files or []:
        from_file = from_firecracker_json(path, refuse=FLEET_REFUSED_SECTIONS)
        config = from_file.vm.replace(
            mem_mib=_first(mem_mib, from_file.vm.mem_mib),
            vcpu_count=_first(vcpus, from_file.vm.vcpu_count),
            boot_args=_first(boot_args, from_file.vm.boot_args),
        )
        kinds.append((config, from_file.dedup, from_file.domain, from_file.pool_root))
    roots: dict[str, Any] = {}
    specs: list[tuple[str, InstanceSpec]] = []
    users: dict[str, int] = {}
    for config, file_dedup, file_domain, file_root in kinds:
        mode = DedupMode.parse(_first(dedup, file_dedup, DedupMode.DKSM.value))
        root_text = _first(pool_root, file_root)
        if root_text is not None and root_text not in roots:
            roots[root_text] = checked_pool_root(root_text)
        root = None if root_text is None else roots[root_text]
        config.validate()
        load_elf(config.kernel_path, config.mem_size)  # bad images fail here, not in N VMs
        device_manager.check_backends(config)  # and missing drives or taps too
        for resource in device_manager.exclusive_resources(config):
            users[resource] = users.get(resource, 0) + instances
        spec = InstanceSpec(config, mode, _first(domain, file_domain, DEFAULT_DOMAIN), root)
        label = Path(config.kernel_path).stem
        specs.extend((label, spec) for _ in range(instances))
    for resource, count in users.items():
        if count > 1:
            raise DksmError(
                f"{resource} would serve {count} VMs, but it serves one VM at a time "
                "(a fleet shares only read-only drives)"
            )
    return specs


def _first(*values: Any) -> Any:
    """The first value that is given (not None)."""
    return next((v for v in values if v is not None), None)


def _up(args: argparse.Namespace) -> int:
    from dksm.cli.run import confinement_credentials
    from dksm.fleet import control

    target = confinement_credentials(args)

    specs = instance_specs(
        args.image,
        args.instances,
        args.mem_mib,
        args.dedup,
        args.domain,
        args.pool_root,
        args.boot_args,
        args.config_file,
        args.vcpus,
    )
    start = time.monotonic()
    handle = control.up(
        specs,
        boot_timeout=args.boot_timeout,
        vms_per_worker=args.vms_per_process,
        hold=args.hold,
        confine_as=target,
        no_confine=target is None,
    )
    members = handle.members()
    failed = [m for m in members if m.state == "failed"]
    print(handle.id)
    print(
        f"dksm: fleet {handle.id}: {len(members) - len(failed)} of {len(members)} VMs booted "
        f"in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
    )
    for m in failed:
        print(f"dksm: vm {m.index} ({m.label}) failed: {m.reason}", file=sys.stderr)
    return ExitStatus.OK if not failed else ExitStatus.ERROR


def _status(args: argparse.Namespace) -> int:
    import json
    from collections import Counter
    from dataclasses import asdict

    from dksm.fleet import control
    from dksm.fleet.directory import LIVE_STATES
    from dksm.memory.accounting import process_memory

    handle = control.find(args.id)
    now = time.time()
    members = handle.members()
    live = [m for m in members if m.state in LIVE_STATES]
    # A worker hosting K VMs is shared by them: each is charged a K-th of its Pss.
    hosted = Counter(m.pid for m in live)
    memory = {pid: process_memory(pid) for pid in hosted}
    rows = []
    for m in members:
        mem = memory.get(m.pid) if m in live else None
        share = mem.pss // hosted[m.pid] if mem else 0
        end = m.ended_at or now
        rows.append({**asdict(m), "uptime_s": round(end - m.started_at, 1), "pss_bytes": share})
    if args.json:
        print(
            json.dumps(
                {"id": handle.id, "supervisor_alive": handle.supervisor_alive(), "members": rows},
                indent=1,
            )
        )
        return ExitStatus.OK
    alive = "running" if handle.supervisor_alive() else "stopped"
    print(f"fleet {handle.id} (supervisor {alive})")
    print(f"{'vm':>4} {'pid':>8} {'image':<12} {'state':<8} {'uptime':>8} {'pss/vm':>9}  reason")
    for r in rows:
        pss = f"{r['pss_bytes'] / MIB:.2f}M" if r["pss_bytes"] else "-"
        print(
            f"{r['index']:>4} {r['pid']:>8} {r['label']:<12} {r['state']:<8} "
            f"{r['uptime_s']:>7.1f}s {pss:>9}  {r['reason']}"
        )
    return ExitStatus.OK


def _down(args: argparse.Namespace) -> int:
    from dksm.fleet import control

    handle = control.find(args.id)
    if handle.over():
        members = handle.state().members
        print(f"fleet {handle.id} is already stopped ({len(members)} VMs, none running)")
        return ExitStatus.OK
    members = handle.down().members
    failed = [m for m in members if m.state == "failed"]
    print(f"fleet {handle.id}: {len(members)} VMs stopped ({len(failed)} had failed)")
    return ExitStatus.OK


def _list(args: argparse.Namespace) -> int:
    from collections import Counter

    from dksm.fleet import control

    fleets = control.all_fleets()
    if not fleets:
        print(f"no fleets on record under {control.runtime_root()}")
        return ExitStatus.OK
    print(f"{'fleet':<20} {'state':<8} {'VMs':>4}  members by state")
    for handle in fleets:
        members = handle.members()
        by_state = Counter(m.state for m in members)
        states = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items())) or "-"
        running = "running" if not handle.over() else "stopped"
        print(f"{handle.id:<20} {running:<8} {len(members):>4}  {states}")
    return ExitStatus.OK


def _prune(args: argparse.Namespace) -> int:
    from dksm.fleet import control

    removed = control.prune()
    print(
        f"removed the records of {len(removed)} stopped fleets" if removed else "nothing to prune"
    )
    for fleet_id in removed:
        print(f"  {fleet_id}")
    return ExitStatus.OK


def _logs(args: argparse.Namespace) -> int:
    from dksm.error import DksmError
    from dksm.fleet import control

    if len(args.where) > 2:
        raise DksmError("fleet logs takes a VM index, optionally after a fleet id")
    fleet_id = args.where[0] if len(args.where) == 2 else None
    index_text = args.where[-1]
    if not index_text.isdigit():
        raise DksmError(f"VM index must be a number, not '{index_text}'")
    handle = control.find(fleet_id)
    path = handle.log_path(int(index_text))
    if not path.exists():
        raise DksmError(f"fleet {handle.id} has no VM {index_text}")
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), path.read_bytes())
    return ExitStatus.OK


def _supervise(args: argparse.Namespace) -> int:
    from dksm.fleet.supervisor import supervise

    return supervise(Path(args.directory))
