"""``dksm cluster``: fleets across the hosts of a Ray cluster, and the simulator."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dksm.vmm.exit_status import ExitStatus

MIB = 1 << 20
POLICY_NAMES = ("sharing-aware", "spread", "random", "round-robin")


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "cluster", help="fleets across hosts (Ray), and the placement simulator"
    )
    csub = parser.add_subparsers(
        dest="cluster_command", required=True, metavar="ACTION", prog="dksm cluster"
    )
    up = csub.add_parser(
        "up", help="connect to a Ray cluster (or start a local one) and an agent per host"
    )
    up.add_argument(
        "--address", default=None, help="a running Ray cluster's address (default: start one here)"
    )
    up.add_argument("--local-nodes", type=int, default=3, metavar="N",
                    help="nodes of the local cluster, each standing for a host (3)")  # fmt: skip
    up.add_argument("--pool-base", default=None, metavar="DIR",
                    help="per-host pool roots go under DIR/HOST (tmpfs; default: the hosts' own"
                    " default, or beside it for a local cluster)")  # fmt: skip
    up.add_argument("--host-memory-mib", type=int, default=None, metavar="MIB",
                    help="memory each host may give VMs (default: its MemAvailable)")  # fmt: skip
    up.add_argument("--domain", default="default", help="page-pool sharing domain ('default')")
    up.set_defaults(handler=_up)
    run = csub.add_parser("run", help="place VMs on the hosts with a policy and start them")
    run.add_argument("--image", action="append", default=[], metavar="NAME_OR_PATH",
                     help="shipped guest name or image path (repeatable)")  # fmt: skip
    run.add_argument("--instances", type=int, default=1, help="VMs per image (1)")
    run.add_argument("--policy", default="sharing-aware", choices=POLICY_NAMES,
                     help="where each VM goes (sharing-aware)")  # fmt: skip
    run.add_argument("--mem-mib", type=int, default=16, help="guest RAM per VM in MiB (16)")
    run.add_argument("--replace-lost", action="store_true",
                     help="also place again the VMs of hosts that were lost")  # fmt: skip
    run.add_argument("--boot-timeout", type=float, default=120.0, metavar="S",
                     help="seconds to wait for every VM's first console line (120)")  # fmt: skip
    run.add_argument("--seed", type=int, default=0, help="seed of the random policy (0)")
    run.add_argument("--boot-args", default=None, help="kernel command line of every VM")
    run.set_defaults(handler=_run)
    status = csub.add_parser("status", help="per host: VMs, pool pages, memory, saved; lost VMs")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)
    down = csub.add_parser("down", help="stop every VM, remove the pools, agents and local cluster")
    down.set_defaults(handler=_down)
    sim = csub.add_parser(
        "sim", help="the placement policies on a simulated cluster (no Ray, no VM)"
    )
    sim.add_argument("--hosts", type=int, default=1000, help="hosts (1000)")
    sim.add_argument("--vms", type=int, default=100_000, help="VMs requested (100000)")
    sim.add_argument("--images", type=int, default=300, help="distinct images (300)")
    sim.add_argument("--zipf", type=float, default=1.0, metavar="S", help="Zipf exponent (1.0)")
    sim.add_argument("--max-drift", type=float, default=0.5,
                     help="largest fraction of pages a variant changes (0.5)")  # fmt: skip
    sim.add_argument("--image-scale", type=int, default=1, metavar="K",
                     help="images K times the real ones' size (1)")  # fmt: skip
    sim.add_argument("--host-memory-mib", type=int, default=None, metavar="MIB",
                     help="memory per host (default: the unshared fleet over the hosts)",
                     )  # fmt: skip
    sim.add_argument("--guest-kib", type=int, default=None, metavar="KIB",
                     help="guest RAM a VM touches besides its image (measured idle: 64)",
                     )  # fmt: skip
    sim.add_argument("--overhead-kib", type=int, default=None, metavar="KIB",
                     help="VMM overhead per VM (measured: 626)")  # fmt: skip
    sim.add_argument("--policy", action="append", choices=POLICY_NAMES, default=None,
                     help="only these policies (repeatable; default all)")  # fmt: skip
    sim.add_argument("--seed", type=int, default=0, help="seed of the catalogue and fleet (0)")
    sim.add_argument("--json", action="store_true", help="print the result as JSON")
    sim.add_argument("image", nargs="*", metavar="IMAGE",
                     help="real images to build the catalogue from (default: the shipped guests"
                     " and, if present, the Unikraft images beside the clone)")  # fmt: skip
    sim.set_defaults(handler=_sim)
    keep = csub.add_parser("keep")  # internal: the local cluster's keeper process
    keep.add_argument("directory")
    keep.add_argument("nodes", type=int)
    keep.set_defaults(handler=_keep)


def _require_ray() -> None:
    from dksm.error import DksmError

    try:
        import ray  # noqa: F401
    except ImportError:
        raise DksmError("dksm cluster needs Ray: pip install 'dksm[cluster]'") from None


def _up(args: argparse.Namespace) -> int:
    _require_ray()
    from dksm.cluster import control

    memory = None if args.host_memory_mib is None else args.host_memory_mib * MIB
    state = control.up(args.address, args.local_nodes, args.pool_base, memory, args.domain)
    print(f"cluster at {state['address']}: {len(state['hosts'])} hosts")
    for host, record in state["hosts"].items():
        print(
            f"  {host}: agent {record['agent_pid']}, pool root {record['pool_root'] or 'default'}"
        )
    return ExitStatus.OK


def _run(args: argparse.Namespace) -> int:
    _require_ray()
    from collections import Counter

    from dksm.cluster import control
    from dksm.vmm.config import DEFAULT_BOOT_ARGS

    boot_args = DEFAULT_BOOT_ARGS if args.boot_args is None else args.boot_args
    placed = control.run(args.image, args.instances, args.policy, args.mem_mib,
                         args.replace_lost, args.boot_timeout, args.seed, boot_args)  # fmt: skip
    by_host = Counter(vm["host"] for vm in placed)
    print(f"{len(placed)} VMs placed ({args.policy}): "
          + ", ".join(f"{h} {n}" for h, n in sorted(by_host.items())))  # fmt: skip
    return ExitStatus.OK


def _status(args: argparse.Namespace) -> int:
    _require_ray()
    from dksm.cluster import control

    doc = control.status()
    if args.json:
        print(json.dumps(doc, indent=1))
        return ExitStatus.OK
    print(f"cluster at {doc['address']}")
    print(f"{'host':<12} {'state':<6} {'VMs':>5} {'pool pages':>10} {'memory':>10} {'saved':>9}")
    for host, h in doc["hosts"].items():
        if not h["alive"]:
            print(f"{host:<12} {'lost':<6} {h['vms']:>5}")
            continue
        print(f"{host:<12} {'up':<6} {h['vms']:>5} {h['pool_pages']:>10} "
              f"{h['memory_bytes'] / MIB:>9.1f}M {h['saved_bytes'] / MIB:>8.1f}M")  # fmt: skip
    if doc["lost_vms"]:
        print(f"{len(doc['lost_vms'])} VMs lost with their hosts; "
              "'dksm cluster run --replace-lost' places them again")  # fmt: skip
    return ExitStatus.OK


def _down(args: argparse.Namespace) -> int:
    _require_ray()
    from dksm.cluster import control

    left = control.down()
    print("cluster down" + (f"; left behind (not dksm's): {', '.join(left)}" if left else ""))
    return ExitStatus.OK


def _default_images() -> list[Path]:
    import os

    from dksm.guests import catalog

    paths = list(catalog().values())
    beside_clone = Path(__file__).resolve().parents[3].parent / "shared" / "unikraft" / "images"
    unikraft = Path(os.environ.get("DKSM_UNIKRAFT_IMAGES") or beside_clone)
    paths += sorted(unikraft.glob("*-fc-x86_64")) if unikraft.is_dir() else []
    return paths


def _sim(args: argparse.Namespace) -> int:
    from dksm.cluster.catalog import KIB, VmCost, read_manifest
    from dksm.cluster.simulation import SimulationSpec, simulate

    defaults = VmCost()
    cost = VmCost(
        defaults.guest_bytes if args.guest_kib is None else args.guest_kib * KIB,
        defaults.overhead_bytes if args.overhead_kib is None else args.overhead_kib * KIB,
    )
    paths = [Path(p) for p in args.image] or _default_images()
    real = [read_manifest(p, 64 * MIB) for p in paths]
    spec = SimulationSpec(
        hosts=args.hosts, vms=args.vms, images=args.images, zipf_s=args.zipf,
        max_drift=args.max_drift, image_scale=args.image_scale,
        host_bytes=None if args.host_memory_mib is None else args.host_memory_mib * MIB,
        cost=cost, seed=args.seed,
    )  # fmt: skip
    result = simulate(spec, real, args.policy or POLICY_NAMES)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return ExitStatus.OK
    print(f"{spec.hosts} hosts of {result.host_bytes / MIB:.0f} MiB, {spec.vms} VMs of "
          f"{spec.images} images from {len(real)} real ones ({result.catalog_pages} distinct "
          f"pages); without sharing {result.unshared_bytes / MIB:,.0f} MiB")  # fmt: skip
    print("| policy | hosts needed | memory (MiB) | saved (MiB) | placement (µs/VM) |")
    print("|---|---|---|---|---|")
    for name, r in result.policies.items():
        print(f"| {name} | {r.hosts_used} | {r.memory_bytes / MIB:,.0f} | "
              f"{r.saved_bytes / MIB:,.0f} | {r.placement_us_per_vm:.1f} |")  # fmt: skip
    sys.stdout.flush()
    return ExitStatus.OK


def _keep(args: argparse.Namespace) -> int:
    from dksm.cluster.local import keep

    return keep(Path(args.directory), args.nodes)
