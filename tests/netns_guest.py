"""Run inside a fresh network namespace (``unshare --net``): make a tap, boot
virtioprobe on it from a Firecracker config file, and talk to the guest the way a
host would -- ARP (the kernel's own), ICMP echo from a raw socket, UDP from a
datagram socket.  Prints one JSON object with what was seen.

The namespace, and the tap with it, vanish when this process exits: nothing on
the host changes.  Traffic goes only to 192.0.2.0/24 (TEST-NET-1) on the tap."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TAP = "dksmtap0"
HOST_IP = "192.0.2.1"
GUEST_IP = "192.0.2.2"
GUEST_MAC = "06:00:c0:00:02:02"


def sh(command: str) -> None:
    subprocess.run(command, shell=True, check=True)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def ping(count: int) -> list[dict[str, Any]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.settimeout(10)
    replies = []
    for seq in range(count):
        payload = b"dksm ping %d" % seq
        header = struct.pack("!BBHHH", 8, 0, 0, 0x4B4D, seq)
        packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), 0x4B4D, seq) + payload
        sent = time.perf_counter()
        sock.sendto(packet, (GUEST_IP, 0))
        while True:
            data, (source, _) = sock.recvfrom(2048)
            ihl = (data[0] & 15) * 4
            kind, _, _, ident, got_seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and ident == 0x4B4D and got_seq == seq:
                break
        replies.append(
            {
                "source": source,
                "payload": data[ihl + 8 :].decode(),
                "checksum_ok": checksum(data[ihl:]) == 0,
                "ms": (time.perf_counter() - sent) * 1000,
            }
        )
    sock.close()
    return replies


def main() -> None:
    work = Path(sys.argv[1])
    kernel = sys.argv[2]
    results: dict[str, Any] = {}
    sh(f"ip link set lo up && ip tuntap add {TAP} mode tap")
    # A tap that is down is refused before the VM is built.
    config = {
        "boot-source": {
            "kernel_image_path": kernel,
            "boot_args": f"console=ttyS0 reboot=k panic=1 pci=off ip={GUEST_IP}",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        "drives": [
            {
                "drive_id": "rootfs",
                "path_on_host": str(work / "rootfs.img"),
                "is_root_device": True,
                "is_read_only": True,
            }
        ],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC}],
    }
    (work / "rootfs.img").write_bytes(bytes(64 * 512))
    (work / "vm.json").write_text(json.dumps(config))
    run = [sys.executable, "-m", "dksm", "run", "--config-file", str(work / "vm.json")]
    down = subprocess.run(run, capture_output=True, text=True, timeout=60)
    results["down"] = {"status": down.returncode, "stderr": down.stderr}
    sh(f"ip addr add {HOST_IP}/24 dev {TAP} && ip link set {TAP} up")
    vm = subprocess.Popen(
        [*run, "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert vm.stdout is not None
        early = ""  # the guest's lines up to its network being ready
        while "net mac" not in early and vm.poll() is None:
            early += vm.stdout.readline()
        results["ping"] = ping(3)
        neighbours = subprocess.run(
            ["ip", "neigh", "show", GUEST_IP, "dev", TAP], capture_output=True, text=True
        )
        results["neighbour"] = neighbours.stdout.strip()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(10)
        udp.bind((HOST_IP, 0))
        udp.sendto(b"echo me", (GUEST_IP, 7))
        data, source = udp.recvfrom(2048)
        results["udp"] = {"payload": data.decode(), "source": list(source)}
        # Another process cannot take the tap while the VM holds it.
        busy = subprocess.run(run, capture_output=True, text=True, timeout=60)
        results["busy"] = {"status": busy.returncode, "stderr": busy.stderr}
        udp.sendto(b"quit", (GUEST_IP, 7))
        udp.recvfrom(2048)
        out, err = vm.communicate(timeout=60)
        results["vm"] = {"status": vm.returncode, "stdout": early + out, "stderr": err}
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.communicate()
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
