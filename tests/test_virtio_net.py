"""virtio-net with a real guest on a real tap, in a network namespace the test
makes (``unshare --net``) and that disappears with it: the host pings the guest,
its kernel resolves the guest's address by ARP, and a UDP datagram comes back
echoed.  The same Firecracker config file carries a read-only root drive, so it
is also the "rootfs drive and network interface" config booting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dksm.guests import guest_path

from conftest import TESTS_DIR, requires_kvm, requires_root

requires_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare (util-linux) and ip (iproute2) for a private network namespace",
)


def _run_in_namespace(tmp_path: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            sys.executable,
            str(TESTS_DIR / "netns_guest.py"),
            str(tmp_path),
            str(guest_path("virtioprobe")),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return doc


@requires_kvm
@requires_root
@requires_unshare
def test_guest_answers_arp_ping_and_udp_over_a_tap(tmp_path: Path) -> None:
    seen = _run_in_namespace(tmp_path)
    # Down first: refused with one line before anything was built.
    assert seen["down"]["status"] == 1
    assert seen["down"]["stderr"].strip().splitlines() == [
        "dksm: error: tap device dksmtap0 is down (bring it up with: ip link set dksmtap0 up)"
    ]
    for seq, reply in enumerate(seen["ping"]):
        assert reply["source"] == "192.0.2.2"
        assert reply["payload"] == f"dksm ping {seq}"
        assert reply["checksum_ok"]
    # The host kernel asked by ARP and the guest answered with its configured MAC.
    assert "lladdr 06:00:c0:00:02:02" in seen["neighbour"]
    assert seen["udp"] == {"payload": "echo me", "source": ["192.0.2.2", 7]}
    assert seen["busy"]["status"] == 1
    assert (
        "cannot attach to tap device dksmtap0: it is in use by another process"
        in (seen["busy"]["stderr"])
    )
    vm = seen["vm"]
    assert vm["status"] == 0, vm["stderr"]
    lines = [x for x in vm["stdout"].splitlines() if x.startswith("virtioprobe: ")]
    assert "virtioprobe: net mac 06:00:c0:00:02:02 ip 192.0.2.2" in lines
    assert "virtioprobe: blk rootfs capacity 64 ro 1" in lines
    assert "virtioprobe: net arp" in lines
    assert [x for x in lines if "net icmp" in x] == [
        f"virtioprobe: net icmp seq {i}" for i in range(3)
    ]
    assert "virtioprobe: net udp 7 bytes" in lines
    assert lines[-1] == "virtioprobe: done"
