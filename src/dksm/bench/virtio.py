"""Measurements of the virtio devices, with the guest kit's ``virtioprobe``.

- **block**: sequential read and write throughput of a guest through virtio-block
  (1 MiB requests, one at a time; a write run ends with a flush), against the
  host reading and writing the same file the same way.  The guest's time is the
  host's clock between the probe's "blkbench start" and "blkbench done" console
  lines.
- **net**: round trips to the guest: ICMP echo and UDP over a tap, and a vsock
  stream, from a network namespace the benchmark makes for itself (root only) and
  that ends with it.
- **initrd sharing**: fleet memory of N VMs given the same initrd, without the
  page pool and with it (the initrd's pages then come from the pool, once).
- **drive sharing**: N VMs reading the same read-only drive end to end: the host
  holds its pages once, in the page cache, however many VMs read it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from dksm.dedup.pool import PagePool, pool_directory
from dksm.error import DksmError
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.guests import guest_path
from dksm.memory.accounting import fleet_memory, page_cache_bytes
from dksm.vmm.builder import build
from dksm.vmm.config import DEFAULT_BOOT_ARGS, VmConfig
from dksm.vmm.device_config import DriveConfig, NetworkInterfaceConfig, VsockConfig

MIB = 1 << 20
CHUNK = MIB  # what virtioprobe moves per request
PROBE = "virtioprobe"


class BenchError(DksmError):
    """A device benchmark could not run; the message says why."""


class TimedConsole:
    """A console sink that notes when each line ended (perf_counter)."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._partial = b""
        self.changed = threading.Condition()

    def write(self, data: bytes, /) -> int:
        now = time.perf_counter()
        self._partial += bytes(data)
        with self.changed:
            while b"\n" in self._partial:
                line, self._partial = self._partial.split(b"\n", 1)
                self.lines.append((now, line.decode(errors="replace")))
            self.changed.notify_all()
        return len(data)

    def when(self, needle: str) -> float:
        for at, line in self.lines:
            if needle in line:
                return at
        raise BenchError(f"the guest never printed {needle!r}: {self.text()!r}")

    def wait_for(self, needle: str, timeout: float) -> None:
        with self.changed:
            if not self.changed.wait_for(
                lambda: any(needle in line for _, line in self.lines), timeout
            ):
                raise BenchError(f"the guest did not print {needle!r} in {timeout:g} s")

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _probe_config(boot_args: str, mem_mib: int = 32) -> VmConfig:
    return VmConfig(
        kernel_path=str(guest_path(PROBE)),
        mem_mib=mem_mib,
        boot_args=f"{DEFAULT_BOOT_ARGS} {boot_args}",
    )


def _run_probe(config: VmConfig, timeout: float = 300) -> TimedConsole:
    console = TimedConsole()
    with contextlib.closing(build(config, serial_sink=console)) as vm:
        outcome = vm.run(timeout)
    if "done" not in console.text():
        raise BenchError(f"virtioprobe did not finish ({outcome.describe()}): {console.text()}")
    return console


# -- block --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockResult:
    size_mib: int
    runs: int
    host_read_mib_s: float
    guest_read_mib_s: float
    host_write_mib_s: float
    guest_write_mib_s: float

    def table(self) -> str:
        rows = [
            f"block, {self.size_mib} MiB sequential in 1 MiB requests, "
            f"median of {self.runs} runs (MiB/s)",
            "| | host | guest (virtio-block) | guest / host |",
            "|---|---|---|---|",
        ]
        for name, host, guest in (
            ("read (page cache warm)", self.host_read_mib_s, self.guest_read_mib_s),
            ("write + fsync", self.host_write_mib_s, self.guest_write_mib_s),
        ):
            rows.append(f"| {name} | {host:.0f} | {guest:.0f} | {guest / host:.2f} |")
        return "\n".join(rows)


def _host_pass(path: Path, size: int, write: bool) -> float:
    buffer = bytearray(CHUNK) if not write else bytearray(os.urandom(CHUNK))
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        start = time.perf_counter()
        for offset in range(0, size, CHUNK):
            if write:
                os.pwrite(fd, buffer, offset)
            else:
                os.preadv(fd, [buffer], offset)
        if write:
            os.fsync(fd)
        return size / MIB / (time.perf_counter() - start)
    finally:
        os.close(fd)


def _guest_pass(path: Path, size_mib: int, write: bool) -> float:
    mode = "write" if write else "read"
    config = _probe_config(f"blkbench={mode}:{size_mib}").replace(
        drives=(DriveConfig("bench", str(path), cache_type="Writeback"),),
    )
    console = _run_probe(config)
    done = [line for _, line in console.lines if "blkbench done" in line]
    if not done or not done[0].endswith("status 0"):
        raise BenchError(f"the guest's {mode} pass failed: {console.text()}")
    elapsed = console.when("blkbench done") - console.when("blkbench start")
    return size_mib / elapsed


def bench_block(size_mib: int = 128, runs: int = 5, directory: str | None = None) -> BlockResult:
    if size_mib < 1 or runs < 1:
        raise BenchError("--size-mib and --runs must be at least 1")
    size = size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="dksm-bench-block-", dir=directory) as tmp:
        path = Path(tmp) / "disk.img"
        with open(path, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(CHUNK))
        samples: dict[str, list[float]] = {k: [] for k in ("hr", "gr", "hw", "gw")}
        _host_pass(path, size, write=False)  # warm the page cache for both readers
        for _ in range(runs):
            samples["hr"].append(_host_pass(path, size, write=False))
            samples["gr"].append(_guest_pass(path, size_mib, write=False))
            samples["hw"].append(_host_pass(path, size, write=True))
            samples["gw"].append(_guest_pass(path, size_mib, write=True))
    median = {k: statistics.median(v) for k, v in samples.items()}
    return BlockResult(size_mib, runs, median["hr"], median["gr"], median["hw"], median["gw"])


# -- network ----------------------------------------------------------------------------------

TAP = "dksmbench0"
HOST_IP = "192.0.2.1"
GUEST_IP = "192.0.2.2"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class NetResult:
    count: int
    icmp_ms: list[float]  # min, median, max
    udp_ms: list[float]
    vsock_ms: list[float]

    def table(self) -> str:
        rows = [
            f"round trips to the guest, {self.count} each (ms)",
            "| path | min | median | max |",
            "|---|---|---|---|",
        ]
        for name, values in (
            ("ICMP echo over virtio-net (tap)", self.icmp_ms),
            ("UDP echo over virtio-net (tap)", self.udp_ms),
            ("vsock stream echo (Unix socket)", self.vsock_ms),
        ):
            rows.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        return "\n".join(rows)


def _summary(values: list[float]) -> list[float]:
    return [round(min(values), 3), round(statistics.median(values), 3), round(max(values), 3)]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def _icmp_round_trips(count: int) -> list[float]:
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.settimeout(5)
        for seq in range(count):
            payload = bytes(56)
            header = struct.pack("!BBHHH", 8, 0, 0, 0x6473, seq)
            packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), 0x6473, seq)
            start = time.perf_counter()
            sock.sendto(packet + payload, (GUEST_IP, 0))
            while True:
                data = sock.recv(2048)
                ihl = (data[0] & 15) * 4
                kind, _, _, ident, got = struct.unpack("!BBHHH", data[ihl : ihl + 8])
                if kind == 0 and ident == 0x6473 and got == seq:
                    break
            times.append((time.perf_counter() - start) * 1000)
    return times


def _udp_round_trips(count: int) -> list[float]:
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.bind((HOST_IP, 0))
        for i in range(count):
            start = time.perf_counter()
            sock.sendto(b"round trip %d" % i, (GUEST_IP, 7))
            sock.recv(2048)
            times.append((time.perf_counter() - start) * 1000)
    return times


def _vsock_round_trips(uds: str, count: int) -> list[float]:
    times = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(uds)
        sock.sendall(b"CONNECT 52\n")
        if not sock.recv(64).startswith(b"OK "):
            raise BenchError("the guest refused the vsock connection")
        for i in range(count):
            message = b"round trip %d\n" % i
            start = time.perf_counter()
            sock.sendall(message)
            got = b""
            while len(got) < len(message):
                got += sock.recv(64)
            times.append((time.perf_counter() - start) * 1000)
    return times


def _net_in_namespace(count: int, workdir: str) -> dict[str, list[float]]:
    """The measurement proper, in a process that has a network namespace of its own."""
    for command in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "tuntap", "add", TAP, "mode", "tap"],
        ["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP],
        ["ip", "link", "set", TAP, "up"],
    ):
        subprocess.run(command, check=True, capture_output=True)
    uds = os.path.join(workdir, "v.sock")
    config = _probe_config(f"ip={GUEST_IP} netquiet").replace(
        network_interfaces=(NetworkInterfaceConfig("eth0", TAP, "06:00:c0:00:02:02"),),
        vsock=VsockConfig(3, uds),
    )
    console = TimedConsole()
    with contextlib.closing(build(config, serial_sink=console)) as vm:
        vm.start()
        console.wait_for("net mac", 60)
        _icmp_round_trips(3)  # ARP resolved, caches warm
        results = {
            "icmp": _icmp_round_trips(count),
            "udp": _udp_round_trips(count),
            "vsock": _vsock_round_trips(uds, count),
        }
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"quit", (GUEST_IP, 7))
        vm.wait(30)
    return results


def bench_net(count: int = 200) -> NetResult:
    if os.geteuid() != 0:
        raise BenchError("the network benchmark needs root (it makes a network namespace)")
    if count < 1:
        raise BenchError("--count must be at least 1")
    read_end, write_end = os.pipe()
    with tempfile.TemporaryDirectory(prefix="dksm-bench-net-") as workdir:
        pid = os.fork()
        if pid == 0:  # the child gets the namespace; the parent's network stays as it was
            status = 1
            try:
                os.close(read_end)
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                if libc.unshare(CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                doc = _net_in_namespace(count, workdir)
                os.write(write_end, json.dumps(doc).encode())
                status = 0
            except BaseException as exc:
                os.write(write_end, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            doc = json.loads(pipe.read() or b'{"error": "the measuring process died"}')
        os.waitpid(pid, 0)
    if "error" in doc:
        raise BenchError(f"network benchmark failed: {doc['error']}")
    return NetResult(count, _summary(doc["icmp"]), _summary(doc["udp"]), _summary(doc["vsock"]))


# -- sharing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharingRow:
    mode: str
    instances: int
    fleet_bytes: int
    fleet_bytes_per_vm: int


@dataclass(frozen=True)
class InitrdResult:
    initrd_mib: int
    instances: int
    rows: list[SharingRow]

    def table(self) -> str:
        lines = [
            f"{self.instances} VMs, each given the same {self.initrd_mib} MiB initrd "
            "(virtioprobe reads a word of every page)",
            "| mode | fleet MiB | MiB per VM |",
            "|---|---|---|",
        ]
        for row in self.rows:
            lines.append(
                f"| {row.mode} | {row.fleet_bytes / MIB:.1f} | {row.fleet_bytes_per_vm / MIB:.2f} |"
            )
        if len(self.rows) == 2:
            saved = self.rows[0].fleet_bytes - self.rows[1].fleet_bytes
            lines.append(f"saved by the pool: {saved / MIB:.1f} MiB")
        return "\n".join(lines)


@contextlib.contextmanager
def _fleet(
    specs: list[tuple[str, InstanceSpec]], vms_per_process: int
) -> Iterator[control.FleetHandle]:
    handle = control.up(specs, vms_per_worker=vms_per_process, boot_timeout=300)
    try:
        for member in handle.members():
            deadline = time.monotonic() + 120
            while "dksm: idle" not in handle.log_path(member.index).read_text():
                if time.monotonic() > deadline:
                    raise BenchError(f"VM {member.index} did not finish its probe")
                time.sleep(0.05)
        time.sleep(1.0)  # settle
        yield handle
    finally:
        handle.down()


def bench_initrd_sharing(
    instances: int = 16, initrd_mib: int = 4, vms_per_process: int = 8
) -> InitrdResult:
    if instances < 1 or initrd_mib < 1:
        raise BenchError("--instances and --initrd-mib must be at least 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dksm-bench-initrd-") as tmp:
        initrd = Path(tmp) / "initrd.img"
        initrd.write_bytes(os.urandom(initrd_mib * MIB))
        config = _probe_config("then=idle", mem_mib=16 + initrd_mib).replace(
            initrd_path=str(initrd)
        )
        for mode in (DedupMode.NONE, DedupMode.DKSM):
            domain = f"bench-initrd-{os.getpid()}"
            spec = InstanceSpec(config, mode, domain)
            with _fleet([(PROBE, spec)] * instances, vms_per_process) as handle:
                pools = [pool_directory(domain)] if mode.uses_pool else []
                total = fleet_memory(handle.process_pids(), pools).total
            rows.append(SharingRow(mode.value, instances, total, total // instances))
            if mode.uses_pool:
                with contextlib.closing(PagePool.open(domain)) as pool:
                    pool.purge()
    return InitrdResult(initrd_mib, instances, rows)


@dataclass(frozen=True)
class DriveResult:
    drive_mib: int
    instances: int
    page_cache_before_bytes: int
    page_cache_after_bytes: int
    fleet_bytes: int

    def table(self) -> str:
        copies = self.instances * self.drive_mib
        return "\n".join(
            [
                f"{self.instances} VMs, each reading all of one {self.drive_mib} MiB read-only "
                "drive (1 MiB requests into one guest buffer)",
                "| | MiB |",
                "|---|---|",
                f"| drive file in the host page cache before | "
                f"{self.page_cache_before_bytes / MIB:.1f} |",
                f"| drive file in the host page cache after | "
                f"{self.page_cache_after_bytes / MIB:.1f} |",
                f"| what {self.instances} private copies of the drive would hold | {copies} |",
                f"| fleet memory (processes + pool) | {self.fleet_bytes / MIB:.1f} |",
            ]
        )


def bench_drive_sharing(
    instances: int = 16, drive_mib: int = 64, vms_per_process: int = 8, directory: str | None = None
) -> DriveResult:
    if instances < 1 or drive_mib < 1:
        raise BenchError("--instances and --drive-mib must be at least 1")
    with tempfile.TemporaryDirectory(prefix="dksm-bench-drive-", dir=directory) as tmp:
        drive = Path(tmp) / "shared.img"
        with open(drive, "wb") as f:
            for _ in range(drive_mib):
                f.write(os.urandom(MIB))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages only
        before = page_cache_bytes(drive)
        config = _probe_config(f"blkbench=read:{drive_mib} then=idle").replace(
            drives=(DriveConfig("shared", str(drive), is_read_only=True),),
        )
        domain = f"bench-drive-{os.getpid()}"
        spec = InstanceSpec(config, DedupMode.DKSM, domain)
        with _fleet([(PROBE, spec)] * instances, vms_per_process) as handle:
            after = page_cache_bytes(drive)
            total = fleet_memory(handle.process_pids(), [pool_directory(domain)]).total
        with contextlib.closing(PagePool.open(domain)) as pool:
            pool.purge()
    return DriveResult(drive_mib, instances, before, after, total)


def to_json(result: BlockResult | NetResult | InitrdResult | DriveResult) -> dict[str, object]:
    return asdict(result)
