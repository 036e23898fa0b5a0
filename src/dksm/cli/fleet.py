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
    parser.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM (16)")
    parser.add_argument("--vcpus", type=int, default=1, help="vCPUs per VM, 1 to 32 (1)")
    parser.add_argument("--dedup", default="dksm", help="none, ksm, dksm or dksm+ksm (dksm)")
    parser.add_argument("--domain", default="default", help="page-pool sharing domain")
    parser.add_argument("--pool-root", default=None, help="page-pool directory (tmpfs)")


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
        help="a Firecracker config file: its kernel, boot args and memory (repeatable)",
    )
    up.add_argument("--instances", type=int, default=1, help="VMs per image")
    up.add_argument("--boot-args", default=None)
    up.add_argument("--boot-timeout", type=float, default=120.0)
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
    up.set_defaults(handler=_up)
    status = fsub.add_parser("status", help="list a fleet's VMs")
    status.add_argument("id", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)
    down = fsub.add_parser("down", help="stop a fleet's VMs and release their pages")
    down.add_argument("id", nargs="?")
    down.set_defaults(handler=_down)
    logs = fsub.add_parser("logs", help="print one VM's console output")
    logs.add_argument("id")
    logs.add_argument("vm", type=int, help="VM index")
    logs.set_defaults(handler=_logs)
    supervise = fsub.add_parser("supervise")  # internal: the fleet's supervisor process
    supervise.add_argument("directory")
    supervise.set_defaults(handler=_supervise)


def instance_specs(
    images: list[str],
    instances: int,
    mem_mib: int,
    dedup: str,
    domain: str,
    pool_root: str | None,
    boot_args: str | None = None,
    config_files: list[str] | None = None,
    vcpus: int = 1,
) -> list[tuple[str, Any]]:
    from dksm.dedup.pool import pool_root as checked_pool_root
    from dksm.error import DksmError
    from dksm.fleet.instance import DedupMode, InstanceSpec
    from dksm.guests import resolve_image
    from dksm.loader.elf import load_elf
    from dksm.vmm import device_manager
    from dksm.vmm.config import DEFAULT_BOOT_ARGS, VmConfig, from_firecracker_json

    if instances < 1:
        raise DksmError(f"--instances must be at least 1, not {instances}")
    if not images and not config_files:
        raise DksmError("a fleet needs at least one --image or --config-file")
    mode = DedupMode.parse(dedup)
    configs = [
        VmConfig(
            kernel_path=str(resolve_image(image)),
            mem_mib=mem_mib,
            vcpu_count=vcpus,
            boot_args=DEFAULT_BOOT_ARGS if boot_args is None else boot_args,
        )
        for image in images
    ]
    configs += [from_firecracker_json(path) for path in config_files or []]
    root = None if pool_root is None else checked_pool_root(pool_root)
    specs: list[tuple[str, InstanceSpec]] = []
    users: dict[str, int] = {}
    for config in configs:
        path = Path(config.kernel_path)
        config.validate()
        load_elf(config.kernel_path, config.mem_size)  # bad images fail here, not in N VMs
        device_manager.check_backends(config)  # and missing drives or taps too
        for resource in device_manager.exclusive_resources(config):
            users[resource] = users.get(resource, 0) + instances
        spec = InstanceSpec(config, mode, domain, root)
        label = path.stem
        specs.extend((label, spec) for _ in range(instances))
    for resource, count in users.items():
        if count > 1:
            raise DksmError(
                f"{resource} would serve {count} VMs, but it serves one VM at a time "
                "(a fleet shares only read-only drives)"
            )
    return specs


def _up(args: argparse.Namespace) -> int:
    from dksm.fleet import control

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
    )
    members = handle.members()
    failed = [m for m in members if m["state"] == "failed"]
    print(handle.id)
    print(
        f"dksm: fleet {handle.id}: {len(members) - len(failed)} of {len(members)} VMs booted "
        f"in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
    )
    for m in failed:
        print(f"dksm: vm {m['index']} ({m['label']}) failed: {m['reason']}", file=sys.stderr)
    return ExitStatus.OK if not failed else ExitStatus.ERROR


def _status(args: argparse.Namespace) -> int:
    import json
    from collections import Counter

    from dksm.fleet import control
    from dksm.fleet.launcher import LIVE_STATES
    from dksm.memory.accounting import process_memory

    handle = control.find(args.id)
    now = time.time()
    live = [m for m in handle.members() if m["state"] in LIVE_STATES]
    # A worker hosting K VMs is shared by them: each is charged a K-th of its Pss.
    hosted = Counter(m["pid"] for m in live)
    memory = {pid: process_memory(pid) for pid in hosted}
    rows = []
    for m in handle.members():
        mem = memory.get(m["pid"]) if m in live else None
        share = mem.pss // hosted[m["pid"]] if mem else 0
        end = m["ended_at"] or now
        rows.append({**m, "uptime_s": round(end - m["started_at"], 1), "pss_bytes": share})
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
    state = handle.down()
    members = state.get("members", [])
    failed = [m for m in members if m["state"] == "failed"]
    print(f"fleet {handle.id}: {len(members)} VMs stopped ({len(failed)} had failed)")
    return ExitStatus.OK


def _logs(args: argparse.Namespace) -> int:
    from dksm.error import DksmError
    from dksm.fleet import control

    handle = control.find(args.id)
    path = handle.log_path(args.vm)
    if not path.exists():
        raise DksmError(f"fleet {handle.id} has no VM {args.vm}")
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), path.read_bytes())
    return ExitStatus.OK


def _supervise(args: argparse.Namespace) -> int:
    from dksm.fleet.supervisor import supervise

    return supervise(Path(args.directory))
