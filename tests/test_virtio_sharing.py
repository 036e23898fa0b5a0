"""What many VMs can share through their devices and boot inputs: an initrd given
to a fleet is mapped copy-on-write from the page pool like an image's read-only
segments (one copy in memory, and a guest that writes over it harms no one); a
read-only drive serves a whole fleet; a read-write drive, a tap or a vsock socket
is refused for more than one VM."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dksm.dedup.pool import pool_directory
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.guests import guest_path
from dksm.vmm.config import VmConfig
from vm_inspect import PAGE, mappings_of, read_guest

from conftest import dksm, requires_kvm, requires_root

pytestmark = [requires_kvm, requires_root]

INITRD_MARK = 0x544952574D534B44


def initrd_sum(data: bytes) -> int:
    padded = data + bytes(-len(data) % PAGE)
    words = (struct.unpack_from("<Q", padded, p)[0] for p in range(0, len(padded), PAGE))
    return int(sum(words)) & ((1 << 64) - 1)


def initrd_line(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith("virtioprobe: initrd ")]


@contextlib.contextmanager
def fleet(members: list[tuple[str, InstanceSpec]]) -> Iterator[control.FleetHandle]:
    handle = control.up(members, vms_per_worker=1)
    try:
        yield handle
    finally:
        handle.down()


def wait_for_line(path: Path, needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"{needle!r} never appeared: {text!r}"
        time.sleep(0.05)


def test_a_fleet_maps_its_initrd_once_from_the_pool(tmp_path: Path) -> None:
    domain = "initrd-fleet"
    data = os.urandom(600 * 1024 + 123)  # not a whole number of pages: the tail page too
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(data)
    config = VmConfig(
        kernel_path=str(guest_path("virtioprobe")),
        mem_mib=16,
        boot_args="console=ttyS0 then=idle",
        initrd_path=str(initrd),
    )
    pages = len(data) // PAGE + 1
    with fleet([("virtioprobe", InstanceSpec(config, DedupMode.DKSM, domain))] * 3) as handle:
        pool_file = str(pool_directory(domain) / "pages")
        # Every guest has read its initrd before any is measured.
        logs = [wait_for_line(handle.log_path(m.index), "dksm: idle") for m in handle.members()]
        for member in handle.members():
            index = member.index
            text = logs[index]
            line = initrd_line(text)[0].split()
            assert line[5:] == [
                str(len(data)),
                "pages",
                str(pages),
                "sum",
                f"0x{initrd_sum(data):016x}",
            ]
            initrd_addr = int(line[3], 16)
            info = handle.info(index)
            assert read_guest(info, initrd_addr, len(data)) == data
            base = info.ram_host_address
            initrd_maps = [
                m
                for m in mappings_of(info.pid, pool_file)
                if base + initrd_addr <= m.start and m.end <= base + initrd_addr + pages * PAGE
            ]
            # Every initrd page comes from the pool; the guest touched one word of each,
            # so each is resident once and shared by the three VMs.
            assert sum(m.end - m.start for m in initrd_maps) == pages * PAGE
            rss = sum(m.rss_kb for m in initrd_maps)
            pss = sum(m.pss_kb for m in initrd_maps)
            assert rss >= pages * PAGE // 1024 - 4
            assert abs(pss - rss / 3) <= max(8, 0.05 * rss), (rss, pss)


def _run_idle(tmp_path: Path, name: str, initrd: Path, extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "dksm", "run", "--kernel", "virtioprobe", "--mem-mib", "16",
            "--initrd", str(initrd), "--domain", "initrd-cow",
            "--boot-args", f"console=ttyS0 then=idle {extra}".strip(),
            "--serial-out", str(tmp_path / f"{name}.log"),
            "--info-file", str(tmp_path / f"{name}.json"),
        ]
    )  # fmt: skip


def test_a_guest_writing_over_its_initrd_changes_no_other_guest(tmp_path: Path) -> None:
    data = os.urandom(64 * PAGE)
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(data)
    reader = _run_idle(tmp_path, "reader", initrd, "")
    writer = None
    try:
        wait_for_line(tmp_path / "reader.log", "dksm: idle")
        writer = _run_idle(tmp_path, "writer", initrd, "initrdwrite")
        text = wait_for_line(tmp_path / "writer.log", "dksm: idle")
        written = [x for x in initrd_line(text) if "written" in x]
        assert written == [f"virtioprobe: initrd written sum 0x{64 * INITRD_MARK % (1 << 64):016x}"]
        info = json.loads((tmp_path / "reader.json").read_text())
        addr = int(initrd_line((tmp_path / "reader.log").read_text())[0].split()[3], 16)
        assert read_guest(info, addr, len(data)) == data  # the reader's copy is untouched
        writer_info = json.loads((tmp_path / "writer.json").read_text())
        assert read_guest(writer_info, addr, 8) == INITRD_MARK.to_bytes(8, "little")
    finally:
        for vm in (reader, writer):
            if vm is not None:
                vm.terminate()
                vm.wait(timeout=30)


def _fleet_config(tmp_path: Path, drive: Path, read_only: bool) -> Path:
    doc = {
        "boot-source": {
            "kernel_image_path": str(guest_path("virtioprobe")),
            "boot_args": "console=ttyS0 then=idle",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
        "drives": [
            {
                "drive_id": "shared",
                "path_on_host": str(drive),
                "is_root_device": True,
                "is_read_only": read_only,
            }
        ],
    }
    path = tmp_path / f"fleet-{read_only}.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_read_only_drive_serves_a_fleet_and_a_read_write_one_is_refused(tmp_path: Path) -> None:
    drive = tmp_path / "shared.img"
    drive.write_bytes(os.urandom(32 * 512))
    up = dksm("fleet", "up", "--config-file", str(_fleet_config(tmp_path, drive, True)),
              "--instances", "3", "--domain", "ro-drive-fleet")  # fmt: skip
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        for vm in range(3):
            deadline = time.monotonic() + 30
            while "dksm: idle" not in (logs := dksm("fleet", "logs", fleet_id, str(vm)).stdout):
                assert time.monotonic() < deadline, logs
                time.sleep(0.1)
            assert "virtioprobe: blk shared capacity 32 ro 1" in logs
            assert "virtioprobe: blk shared write refused status 1" in logs
    finally:
        assert dksm("fleet", "down", fleet_id).returncode == 0
    refused = dksm("fleet", "up", "--config-file", str(_fleet_config(tmp_path, drive, False)),
                   "--instances", "2", "--domain", "rw-drive-fleet")  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"dksm: error: read-write drive {drive} would serve 2 VMs, but it serves one VM at a "
        "time (a fleet shares only read-only drives)"
    ]


def test_a_confined_fleet_vm_leaves_no_vsock_socket_behind(tmp_path: Path) -> None:
    # The worker made the socket before it was confined and may not remove it after;
    # the supervisor removes it once the worker has ended.  (With a vsock device the
    # probe serves the host until it is stopped.)
    uds = tmp_path / "fleet-vsock.sock"
    config = tmp_path / "vsock-fleet.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {
                    "kernel_image_path": str(guest_path("virtioprobe")),
                    "boot_args": "console=ttyS0",
                },
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
                "vsock": {"guest_cid": 3, "uds_path": str(uds)},
            }
        )
    )
    up = dksm("fleet", "up", "--config-file", str(config), "--domain", "vsock-fleet")
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while "vsock cid 3" not in (logs := dksm("fleet", "logs", fleet_id, "0").stdout):
            assert time.monotonic() < deadline, logs
            time.sleep(0.1)
        assert uds.is_socket()
    finally:
        assert dksm("fleet", "down", fleet_id).returncode == 0
    assert not uds.exists()
