"""Make VM builds fail at each step, for real, and count what the process holds.

Run as a script in a process of its own (``tests/test_build_cleanup.py`` does, inside
``unshare --net`` where it can, so that a tap exists for the length of this process
only).  Each failure comes from a real cause: a bad config, a missing drive, a
missing tap, a vsock socket that cannot be made, a descriptor limit
(``RLIMIT_NOFILE``) that lets the build open exactly ``k`` more descriptors for
every ``k`` until it succeeds, an address-space limit (``RLIMIT_AS``) too small for
guest RAM, and a device that is not KVM.  Before and after each failure it records
the process's descriptors (``/proc/self/fd``, with their targets), its mappings
(``/proc/self/maps``) and its threads (``/proc/self/task``).  Prints one JSON
object: for each case, the errors the builds raised and the counts before and after.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from dksm.error import DksmError
from dksm.guests import guest_path
from dksm.kvm.system import Kvm
from dksm.vmm import builder
from dksm.vmm.config import VmConfig
from dksm.vmm.device_config import DriveConfig, EntropyConfig, NetworkInterfaceConfig, VsockConfig

REPEATS = 5
MEM_MIB = 32


def descriptors() -> dict[int, str]:
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            held[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            continue
    return held


def mappings() -> list[tuple[str, int]]:
    """The name ("" for an anonymous one) and size of each mapping, read at once:
    reading allocates, which may map an arena of the allocator in between two reads."""
    with open("/proc/self/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    found = []
    for f in fields:
        start, end = f[0].split("-")
        found.append((f[5].strip() if len(f) == 6 else "", int(end, 16) - int(start, 16)))
    return found


def mapped_bytes() -> int:
    return sum(size for _, size in mappings())


def snapshot() -> dict[str, Any]:
    gc.collect()
    maps = mappings()
    return {
        "fds": descriptors(),
        "named_maps": sorted(name for name, _ in maps if name),
        "maps": len(maps),
        "mapped_bytes": sum(size for _, size in maps),
        "threads": len(os.listdir("/proc/self/task")),
    }


@contextmanager
def limit(which: int, soft: int) -> Iterator[None]:
    old = resource.getrlimit(which)
    resource.setrlimit(which, (soft, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(which, old)


class Console:
    def write(self, data: bytes, /) -> int:
        return len(data)


def attempt(config: VmConfig, guard: Callable[[], Any] | None = None) -> str | None:
    """Build ``config`` (under ``guard``, a limit, if given); the error's class and
    message, or None if the build succeeded (the VM is closed at once)."""
    try:
        if guard is None:
            vm = builder.build(config, serial_sink=Console())
        else:
            with guard():
                vm = builder.build(config, serial_sink=Console())
    except DksmError as exc:
        return f"{type(exc).__name__}: {exc}"
    except BaseException as exc:  # anything else would be a traceback for the user
        return f"UNEXPECTED {type(exc).__name__}: {exc}"
    vm.close()
    return None


def repeated(config: VmConfig, guard: Callable[[], Any] | None = None) -> dict[str, Any]:
    before = snapshot()
    errors = [attempt(config, guard) for _ in range(REPEATS)]
    return {"errors": errors, "before": before, "after": snapshot()}


def fd_sweep(config: VmConfig) -> dict[str, Any]:
    """Allow the build ``k`` more descriptors, for k = 0, 1, ... until it succeeds.

    A new descriptor takes the lowest free number, and the limit refuses numbers
    from ``soft`` on: so ``soft`` is the ``k``-th free number."""
    steps = []
    for extra in range(200):
        before = snapshot()
        free = (n for n in range(1 << 16) if n not in before["fds"])
        soft = [next(free) for _ in range(extra + 1)][-1]
        error = attempt(config, partial(limit, resource.RLIMIT_NOFILE, soft))
        steps.append({"extra": extra, "error": error, "before": before, "after": snapshot()})
        if error is None:
            break
    return {"steps": steps}


def address_space(config: VmConfig) -> dict[str, Any]:
    """Leave room for everything but guest RAM (which the build maps after KVM's
    handles and the VM exist)."""
    room = mapped_bytes() + config.mem_size - (4 << 20)
    return repeated(config, lambda: limit(resource.RLIMIT_AS, room))


def not_kvm() -> dict[str, Any]:
    """``/dev/null`` opens but answers no KVM ioctl: the version check fails."""
    before = snapshot()
    errors: list[str | None] = []
    for _ in range(REPEATS):
        try:
            Kvm("/dev/null").close()
            errors.append(None)
        except DksmError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return {"errors": errors, "before": before, "after": snapshot()}


def make_tap() -> str | None:
    """A tap, if this process runs in a network namespace of its own (the caller
    says so); it vanishes with the namespace."""
    if os.environ.get("DKSM_TEST_NETNS") != "1":
        return None
    tap = "dksmtap0"
    subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    return tap


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="dksm-build-failures-"))
    try:
        disk = work / "disk.img"
        disk.write_bytes(bytes(1 << 20))
        spare = work / "spare.img"
        spare.write_bytes(bytes(1 << 20))
        tap = make_tap()
        base = VmConfig(kernel_path=str(guest_path("virtioprobe")), mem_mib=MEM_MIB, vcpu_count=2)
        drives = (
            DriveConfig("root", str(disk), is_root_device=True),
            DriveConfig("spare", str(spare), is_read_only=True),
        )
        full = base.replace(
            drives=drives,
            network_interfaces=(NetworkInterfaceConfig("eth0", tap),) if tap else (),
            vsock=VsockConfig(3, str(work / "v.sock")),
            entropy=EntropyConfig(),
        )
        # Load every module a build uses and ask KVM for CPUID once, as a fleet
        # worker does, so that what is counted is the build's alone.
        builder.preload_host_cpuid()
        warm = attempt(full)
        cases: dict[str, Any] = {"tap": tap, "warm_build": warm}
        not_elf = work / "not-an-image"
        not_elf.write_bytes(b"plain text, not an ELF image\n" * 10)
        gone = work / "gone.img"
        cases["bad_config"] = repeated(full.replace(vcpu_count=0))
        cases["bad_image"] = repeated(full.replace(kernel_path=str(not_elf)))
        cases["missing_drive"] = repeated(
            full.replace(drives=(drives[0], DriveConfig("gone", str(gone))))
        )
        cases["missing_tap"] = repeated(
            full.replace(network_interfaces=(NetworkInterfaceConfig("eth0", "dksmnotap9"),))
        )
        cases["vsock_directory_missing"] = repeated(
            full.replace(vsock=VsockConfig(3, str(work / "no-such-dir" / "v.sock")))
        )
        cases["address_space"] = address_space(full)
        cases["not_kvm"] = not_kvm()
        cases["fd_sweep"] = fd_sweep(full)
        cases["leftover_files"] = sorted(p.name for p in work.iterdir())
        json.dump(cases, sys.stdout)
    finally:
        for path in work.iterdir():
            path.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
