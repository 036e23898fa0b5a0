"""virtio devices with a real guest: the guest kit's ``virtioprobe`` boots under
``dksm run --config-file`` with Firecracker config files, finds its devices on
the command line and uses them; the host checks what it did.

Block: what the guest writes is in the host file, byte for byte; a read-only
drive refuses writes and stays unchanged; reads past the end fail.  Entropy: the
bytes arrive and differ.  Broken queues: the device asks for a reset, the VMM
goes on and the device works again after it.  vsock: both directions of
Firecracker's hybrid scheme.  Bad host-side input: one clear line, status 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dksm.guests import guest_path

from conftest import dksm, requires_kvm, requires_root

SECTOR = 512


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for c in data:
        h = ((h ^ c) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def pattern(offset: int, length: int) -> bytes:
    """What virtioprobe writes at absolute disk offsets (guests/apps/virtioprobe.c)."""
    return bytes(((o * 7) ^ (o >> 9) ^ 0x5A) & 0xFF for o in range(offset, offset + length))


def write_config(tmp_path: Path, boot_args: str = "", **devices: Any) -> Path:
    doc: dict[str, Any] = {
        "boot-source": {
            "kernel_image_path": str(guest_path("virtioprobe")),
            "boot_args": f"console=ttyS0 reboot=k panic=1 pci=off {boot_args}".strip(),
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    }
    doc.update({k.replace("_", "-"): v for k, v in devices.items()})
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(doc))
    return path


def probe_lines(stdout: str) -> list[str]:
    return [
        line[len("virtioprobe: ") :]
        for line in stdout.splitlines()
        if line.startswith("virtioprobe: ")
    ]


def drive(
    drive_id: str, path: Path, *, read_only: bool = False, root: bool = False
) -> dict[str, Any]:
    return {
        "drive_id": drive_id,
        "path_on_host": str(path),
        "is_root_device": root,
        "is_read_only": read_only,
    }


@requires_kvm
def test_guest_writes_sectors_that_the_host_file_holds(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    original = os.urandom(256 * SECTOR)
    disk.write_bytes(original)
    config = write_config(tmp_path, "blkwrite=37", drives=[drive("data", disk)], entropy={})
    result = dksm("run", "--config-file", str(config), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    lines = probe_lines(result.stdout)
    assert "blk data capacity 256 ro 0" in lines
    assert f"blk data sector 0 fnv 0x{fnv1a64(original[:SECTOR]):016x} status 0" in lines
    assert f"blk data sector 255 fnv 0x{fnv1a64(original[-SECTOR:]):016x} status 0" in lines
    assert "blk data read past end status 1" in lines
    assert "blk data wrote 8 sectors at 37 status 0 flush 0 readback ok" in lines
    after = disk.read_bytes()
    start = 37 * SECTOR
    assert after[start : start + 4096] == pattern(start, 4096)
    assert after[:start] == original[:start] and after[start + 4096 :] == original[start + 4096 :]


@requires_kvm
def test_read_only_drive_refuses_writes_and_stays_unchanged(tmp_path: Path) -> None:
    disk = tmp_path / "ro.img"
    original = os.urandom(64 * SECTOR)
    disk.write_bytes(original)
    disk.chmod(0o444)
    config = write_config(tmp_path, drives=[drive("rootfs", disk, read_only=True, root=True)])
    result = dksm("run", "--config-file", str(config), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    lines = probe_lines(result.stdout)
    cmdline = lines[1]
    # Firecracker's root-device words, then the device itself.
    assert re.search(r" root=/dev/vda ro virtio_mmio.device=4K@0xd0000000:5\"$", cmdline), cmdline
    assert "blk rootfs capacity 64 ro 1" in lines
    assert "blk rootfs write refused status 1" in lines
    zero = f"blk rootfs sector 0 fnv 0x{fnv1a64(original[:SECTOR]):016x} status 0"
    assert lines.count(zero) == 2  # before and after the refused write
    assert disk.read_bytes() == original


@requires_kvm
def test_entropy_bytes_arrive_and_differ(tmp_path: Path) -> None:
    config = write_config(tmp_path, entropy={})
    result = dksm("run", "--config-file", str(config), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    randoms = [line.split()[1] for line in probe_lines(result.stdout) if line.startswith("rng ")]
    assert len(randoms) == 2
    assert all(re.fullmatch(r"[0-9a-f]{64}", r) for r in randoms)
    assert randoms[0] != randoms[1] and "0" * 64 not in randoms


@requires_kvm
def test_broken_queues_leave_the_vmm_running_and_the_device_recovers(tmp_path: Path) -> None:
    config = write_config(tmp_path, "bad=all", entropy={})
    result = dksm("run", "--config-file", str(config), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    lines = probe_lines(result.stdout)
    kinds = ["outside", "loop", "direction", "index", "jump", "notready"]
    for kind in kinds:
        assert any(
            re.fullmatch(rf"bad {kind} status 0x4[0-9a-f] \(needs reset\)", x) for x in lines
        )
        assert f"bad {kind} after reset rng ok" in lines
    assert lines[-1] == "done"
    # One log line per broken queue, naming the problem; no traceback.
    log = [x for x in result.stderr.splitlines() if "needs a reset" in x]
    assert len(log) == len(kinds), result.stderr
    assert any("outside guest RAM" in x for x in log)
    assert any("a loop?" in x for x in log)
    assert "Traceback" not in result.stderr


@requires_kvm
def test_firecracker_devices_sit_in_the_mmio_gap_in_firecrackers_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(4096))
    b.write_bytes(bytes(4096))
    config = write_config(
        tmp_path,
        drives=[drive("data", a, read_only=True), drive("root", b, read_only=True, root=True)],
        entropy={},
    )
    result = dksm("run", "--config-file", str(config), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    lines = probe_lines(result.stdout)
    assert "device 0 at 0xd0000000 irq 5 type 2" in lines
    assert "device 1 at 0xd0001000 irq 6 type 2" in lines
    assert "device 2 at 0xd0002000 irq 7 type 4" in lines
    ids = [x.split()[1] for x in lines if x.startswith("blk ") and " capacity " in x]
    assert ids == ["root", "data"]  # the root drive is /dev/vda


def _vsock_vm(config: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dksm",
            "run",
            "--config-file",
            str(config),
            "--timeout",
            "60",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


CONFINED_ID = 65534  # the user a VMM run as root confines itself to


@pytest.fixture
def vsock_dir() -> Iterator[Path]:
    """A directory the confined VMM's user may reach (pytest's own is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="dksm-vsock-", dir="/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@requires_kvm
@pytest.mark.parametrize("confined", [True, False], ids=["confined", "unconfined"])
def test_vsock_connects_both_ways_like_firecracker(
    tmp_path: Path, vsock_dir: Path, confined: bool
) -> None:
    """Both directions, with the VMM confined (its threads within the seccomp filter,
    the guest's connection made as the confined user, the socket removed by the
    process that stayed privileged) and without."""
    uds = vsock_dir / "v.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{uds}_60")  # the guest connects to host port 60
    if confined and os.geteuid() == 0:  # the confined VMM connects as its own user
        os.chown(f"{uds}_60", CONFINED_ID, CONFINED_ID)
    listener.listen(1)
    listener.settimeout(30)
    config = write_config(tmp_path, "vsockconnect=60", vsock={"guest_cid": 7, "uds_path": str(uds)})
    vm = _vsock_vm(config, *([] if confined else ["--no-confine"]))
    try:
        conn, _ = listener.accept()
        conn.settimeout(30)
        assert conn.recv(100) == b"hello from the guest\n"
        conn.sendall(b"hi guest\n")
        assert conn.recv(100) == b""  # the guest shut its connection down
        conn.close()
        _wait_for(uds)
        host = socket.socket(socket.AF_UNIX)
        host.settimeout(30)
        for _ in range(100):  # the guest serves once its own connection is done
            host.connect(str(uds))
            host.sendall(b"CONNECT 52\n")
            answer = host.recv(100)
            if answer:
                break
            host.close()
            host = socket.socket(socket.AF_UNIX)
            host.settimeout(30)
            time.sleep(0.1)
        assert re.fullmatch(rb"OK \d+\n", answer), answer
        host.sendall(b"ping over vsock\n")
        assert host.recv(100) == b"ping over vsock\n"
        host.sendall(b"quit\n")
        assert host.recv(100) == b"quit\n"
        out, err = vm.communicate(timeout=60)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
        listener.close()
    assert vm.returncode == 0, err
    lines = probe_lines(out)
    assert "vsock cid 7" in lines
    assert 'vsock host said "hi guest"' in lines
    assert any(x.startswith("vsock accepted port 52 from host port ") for x in lines)
    assert not uds.exists()  # the VMM (or its guardian) removed the socket it made
    assert "Bad system call" not in err and vm.returncode != -31


@requires_kvm
def test_vsock_refuses_a_socket_path_that_exists(tmp_path: Path) -> None:
    uds = tmp_path / "taken.sock"
    uds.write_text("not a socket")
    config = write_config(tmp_path, vsock={"guest_cid": 3, "uds_path": str(uds)})
    result = dksm("run", "--config-file", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"dksm: error: vsock socket path {uds} already exists "
        "(remove it, or choose another uds_path)"
    ]
    assert uds.read_text() == "not a socket"


BAD_DEVICES: dict[str, tuple[dict[str, Any], str]] = {
    "missing drive": (
        {
            "drives": [
                {
                    "drive_id": "root",
                    "path_on_host": "/nonexistent/disk.img",
                    "is_root_device": True,
                }
            ]
        },
        "cannot open drive file /nonexistent/disk.img read-write: No such file or directory",
    ),
    "drive is a directory": (
        {
            "drives": [
                {
                    "drive_id": "root",
                    "path_on_host": "/",
                    "is_root_device": True,
                    "is_read_only": True,
                }
            ]
        },
        "drive file / is not a regular file or a block device",
    ),
    "missing tap": (
        {"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "dksmnotap0"}]},
        "tap device dksmnotap0 does not exist (create it with: ip tuntap add dksmnotap0 mode tap)",
    ),
    "bad mac": (
        {"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "t0", "guest_mac": "zz"}]},
        "'zz' is not a MAC address",
    ),
    "rate limiter": (
        {"entropy": {"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}},
        "entropy.rate_limiter: rate limiters are not supported",
    ),
    "unknown field": (
        {"drives": [{"drive_id": "a", "path_on_host": "/x", "is_root_device": False, "speed": 9}]},
        "drives[0].speed: unknown field",
    ),
    "two roots": (
        {
            "drives": [
                {"drive_id": "a", "path_on_host": "/x", "is_root_device": True},
                {"drive_id": "b", "path_on_host": "/y", "is_root_device": True},
            ]
        },
        "only one drive may be the root device, not a, b",
    ),
    "same id twice": (
        {
            "drives": [
                {"drive_id": "a", "path_on_host": "/x", "is_root_device": False},
                {"drive_id": "a", "path_on_host": "/y", "is_root_device": False},
            ]
        },
        "drive 'a' is given twice",
    ),
    "bad drive id": (
        {"drives": [{"drive_id": "no/slash", "path_on_host": "/x", "is_root_device": False}]},
        "drive id 'no/slash' must be 1 to 64 letters, digits or underscores",
    ),
    "cid 2": (
        {"vsock": {"guest_cid": 2, "uds_path": "/tmp/x"}},
        "vsock.guest_cid: Input should be greater than or equal to 3",
    ),
    "too many devices": (
        {
            "drives": [
                {
                    "drive_id": f"d{i}",
                    "path_on_host": "/x",
                    "is_root_device": False,
                    "is_read_only": True,
                }
                for i in range(20)
            ]
        },
        "20 virtio devices are too many: at most 19",
    ),
    "cid above 32 bits": (
        {"vsock": {"guest_cid": 1 << 32, "uds_path": "/tmp/x"}},
        "vsock guest_cid must be 3 to 4294967295",
    ),
    "NUL in a drive path": (
        {"drives": [{"drive_id": "a", "path_on_host": "/x\u0000y", "is_root_device": False}]},
        "drive a: path_on_host path '/x\\x00y' contains a NUL byte",
    ),
    "drive is a FIFO": (
        {"drives": [{"drive_id": "a", "path_on_host": "FIFO", "is_root_device": False}]},
        "drive file FIFO is not a regular file or a block device",
    ),
    "vhost-user": (
        {"drives": [{"drive_id": "a", "socket": "/s", "is_root_device": False}]},
        "vhost-user drives are not supported",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DEVICES))
def test_bad_device_configs_end_in_one_line(tmp_path: Path, case: str) -> None:
    devices, message = BAD_DEVICES[case]
    config = write_config(tmp_path)
    doc = json.loads(config.read_text())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would block for ever
    doc.update(json.loads(json.dumps(devices).replace('"FIFO"', json.dumps(str(fifo)))))
    message = message.replace("FIFO", str(fifo))
    config.write_text(json.dumps(doc))
    result = dksm("run", "--config-file", str(config))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dksm: error: "), result.stderr
    assert message in lines[0]


@requires_kvm
def test_a_drive_whose_size_is_not_whole_sectors_hides_its_tail(tmp_path: Path) -> None:
    disk = tmp_path / "odd.img"
    disk.write_bytes(os.urandom(10 * SECTOR + 100))
    config = write_config(tmp_path, drives=[drive("odd", disk, read_only=True)])
    result = dksm("run", "--config-file", str(config), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert "blk odd capacity 10 ro 1" in probe_lines(result.stdout)
    assert "the last 100 bytes are not visible to the guest" in result.stderr


def test_firecracker_device_sections_become_config_fields_and_survive_a_fleet_spec(
    tmp_path: Path,
) -> None:
    from dksm.vmm.config import VmConfig, from_firecracker_json
    from dksm.vmm.device_config import (
        DriveConfig,
        EntropyConfig,
        NetworkInterfaceConfig,
        VsockConfig,
    )

    path = write_config(
        tmp_path,
        drives=[
            {
                "drive_id": "rootfs",
                "path_on_host": "/images/rootfs.ext4",
                "is_root_device": True,
                "is_read_only": False,
                "partuuid": None,
                "cache_type": "Writeback",
                "io_engine": "Sync",
                "rate_limiter": None,
            }
        ],
        network_interfaces=[
            {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02",
             "rx_rate_limiter": None, "tx_rate_limiter": None}
        ],
        vsock={"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"},
        entropy={"rate_limiter": None},
    )  # fmt: skip
    config = from_firecracker_json(str(path)).vm
    assert config.drives == (
        DriveConfig("rootfs", "/images/rootfs.ext4", True, False, None, "Writeback"),
    )
    assert config.network_interfaces == (
        NetworkInterfaceConfig("eth0", "tap0", "06:00:AC:10:00:02"),
    )
    assert config.vsock == VsockConfig(3, "/tmp/v.sock", "vsock0")
    assert config.entropy == EntropyConfig()
    assert VmConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "full"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@requires_kvm
@requires_root
def test_a_full_disk_fails_the_guests_write_not_the_vm(full_tmpfs: Path) -> None:
    disk = full_tmpfs / "sparse.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)  # 1 MiB that the 64 KiB file system cannot hold
    (full_tmpfs / "filler").write_bytes(bytes(60 * 1024))
    config = write_config(full_tmpfs.parent, "blkwrite=100", drives=[drive("full", disk)])
    result = dksm("run", "--config-file", str(config), "--timeout", "60")
    assert result.returncode == 0, result.stderr
    lines = probe_lines(result.stdout)
    wrote = [x for x in lines if x.startswith("blk full wrote")]
    assert wrote and wrote[0].startswith("blk full wrote 8 sectors at 100 status 1 ")
    assert lines[-1] == "done"
    assert "No space left on device (the guest sees an IO error)" in result.stderr
    assert "Traceback" not in result.stderr


@requires_kvm
def test_the_data_path_bypasses_the_vcpu_loop(tmp_path: Path) -> None:
    """Queue notifications reach the device through KVM's ioeventfd and interrupts
    leave through irqfd: no notification arrives as an MMIO exit, however many
    requests the guest makes."""

    from dksm.devices.virtio.block import Block
    from dksm.devices.virtio.entropy import Entropy
    from dksm.vmm.builder import build
    from dksm.vmm.config import VmConfig
    from dksm.vmm.device_config import DriveConfig, EntropyConfig
    from dksm.vmm.device_manager import AttachedDevice

    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(16 << 20))
    config = VmConfig(
        kernel_path=str(guest_path("virtioprobe")),
        mem_mib=32,
        boot_args="console=ttyS0 blkbench=read:16",
    ).replace(
        drives=(DriveConfig("disk", str(disk), is_read_only=True),),
        entropy=EntropyConfig(),
    )
    output = bytearray()

    class Console:
        def write(self, data: bytes, /) -> int:
            output.extend(data)
            return len(data)

    vm = build(config, serial_sink=Console())
    try:
        outcome = vm.run(60)
        attached = [d for d in vm.devices if isinstance(d, AttachedDevice)]
        block, entropy = (d.device for d in attached)
        assert isinstance(block, Block) and isinstance(entropy, Entropy)
        assert outcome.cause.name == "GUEST_SHUTDOWN", output.decode()
        assert b"blkbench done 16777216 status 0" in output
        assert block.requests >= 17 and entropy.bytes_given == 64
        assert all(d.transport is not None and d.transport.notify_exits == 0 for d in attached)
        assert block.interrupt is not None and block.interrupt.raised >= 17
    finally:
        vm.close()
