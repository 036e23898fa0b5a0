"""dksm-firecracker driven as Firecracker is: the real console script started with
``--api-sock``, and existing HTTP clients (httpx's Unix-socket transport,
requests-unixsocket, a raw socket for the abuse) talking to it over the socket,
through Firecracker's getting-started sequence on real /dev/kvm."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import requests_unixsocket

from conftest import requires_kvm

pytestmark = requires_kvm

AsmGuest = Callable[[str], Path]
FIRECRACKER = Path(sys.executable).parent / "dksm-firecracker"


class FrontDoor:
    """One dksm-firecracker process: its socket, console output, log and metrics."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.sock = str(directory / "api.sock")
        self.console = directory / "console.out"
        self.log = directory / "vmm.log"
        self.metrics = directory / "metrics.json"
        self.stderr = directory / "stderr.txt"
        with open(self.console, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [str(FIRECRACKER), "--api-sock", self.sock, "--id", "test-vm",
                 "--log-path", str(self.log), "--level", "Debug", "--show-level",
                 "--metrics-path", str(self.metrics), *extra],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.stderr.read_text()
            assert time.monotonic() < deadline, "the API socket never appeared"
            time.sleep(0.02)

    def httpx(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.sock), base_url="http://fc")

    def requests_url(self, path: str) -> str:
        return "http+unix://" + urllib.parse.quote_plus(self.sock) + path

    def raw(self, request: bytes, *, read: bool = True) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(self.sock)
            s.sendall(request)
            if not read:
                return b""
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def metrics_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def front_door(tmp_path: Path) -> Iterator[Callable[..., FrontDoor]]:
    started: list[FrontDoor] = []

    def start(*extra: str) -> FrontDoor:
        door = FrontDoor(tmp_path, *extra)
        started.append(door)
        return door

    yield start
    for door in started:
        door.close()


def test_getting_started_sequence_boots_the_guest(front_door: Callable[..., FrontDoor]) -> None:
    """Firecracker's getting-started steps with httpx: describe, configure the machine
    and boot source, start, read the guest's console; the process ends with the guest."""
    door = front_door()
    with door.httpx() as api:
        info = api.get("/")
        assert info.status_code == 200
        assert info.json()["state"] == "Not started"
        assert info.json()["id"] == "test-vm"
        assert api.get("/version").json()["firecracker_version"]
        put = api.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 32, "smt": False})
        assert put.status_code == 204, put.text
        assert api.get("/machine-config").json()["vcpu_count"] == 2
        patch = api.patch("/machine-config", json={"mem_size_mib": 48})
        assert patch.status_code == 204, patch.text
        boot = {"kernel_image_path": "hello", "boot_args": "console=ttyS0 a=1 b=two"}
        assert api.put("/boot-source", json=boot).status_code == 204
        exported = api.get("/vm/config").json()
        assert exported["boot-source"] == boot
        assert exported["machine-config"]["mem_size_mib"] == 48
        start = api.put("/actions", json={"action_type": "InstanceStart"})
        assert start.status_code == 204, start.text
    assert door.wait() == 0
    console = door.console.read_text()
    assert 'hello: cmdline="console=ttyS0 a=1 b=two"' in console
    assert "hello: bye" in console
    assert "0x0000000000100000-0x0000000002ffffff" in console  # 48 MiB, as patched
    log = door.log.read_text()
    assert "[test-vm:fc_api:INFO]" in log
    assert 'received a PUT request on "/actions"' in log
    last = door.metrics_lines()[-1]  # written when the VM ended
    assert last["put_api_requests"]["actions_count"] == 1  # type: ignore[index]
    assert last["uart"]["write_count"] == len(console.encode())  # type: ignore[index]
    assert not os.path.exists(door.sock)  # the socket is removed at exit


def test_pause_holds_the_guest_and_resume_lets_it_run(
    front_door: Callable[..., FrontDoor], asm_guest: AsmGuest
) -> None:
    """With requests-unixsocket: a guest printing dots for ever makes no progress
    while paused, and goes on once resumed; GET / follows the state; metrics flush on
    FlushMetrics; what is pre-boot only is refused after the start."""
    door = front_door()
    session = requests_unixsocket.Session()
    url = door.requests_url
    boot = {"kernel_image_path": str(asm_guest("tick_forever"))}
    assert session.put(url("/boot-source"), json=boot).status_code == 204
    assert session.put(url("/machine-config"), json={"vcpu_count": 2, "mem_size_mib": 16}).ok
    assert session.put(url("/actions"), json={"action_type": "InstanceStart"}).status_code == 204
    assert session.get(url("/")).json()["state"] == "Running"

    def dots() -> int:
        return door.console.stat().st_size

    def wait_for_progress(since: int) -> None:
        deadline = time.monotonic() + 20
        while dots() < since + 5:
            assert time.monotonic() < deadline, f"the guest does not run ({since}, {dots()})"
            time.sleep(0.05)

    wait_for_progress(0)
    paused = session.patch(url("/vm"), json={"state": "Paused"})
    assert paused.status_code == 204, paused.text
    assert session.get(url("/")).json()["state"] == "Paused"
    held = dots()
    time.sleep(0.5)
    assert dots() == held  # not one byte while paused
    assert session.patch(url("/vm"), json={"state": "Resumed"}).status_code == 204
    assert session.get(url("/")).json()["state"] == "Running"
    wait_for_progress(held)

    again = session.put(url("/machine-config"), json={"vcpu_count": 1, "mem_size_mib": 16})
    assert again.status_code == 400
    assert "not supported after starting" in again.json()["fault_message"]
    # Ctrl+Alt+Del reaches the guest's keyboard controller; this guest ignores it.
    assert session.put(url("/actions"), json={"action_type": "SendCtrlAltDel"}).status_code == 204
    flushed = session.put(url("/actions"), json={"action_type": "FlushMetrics"})
    assert flushed.status_code == 204
    line = door.metrics_lines()[-1]
    assert line["vcpu"]["exit_io_out"] > 0  # type: ignore[index]
    assert line["patch_api_requests"]["vm_count"] == 2  # type: ignore[index]
    assert line["put_api_requests"]["machine_cfg_fails"] == 1  # type: ignore[index]
    dksm_group = line["dksm"]
    assert dksm_group["dedup"] == "dksm"  # type: ignore[index]
    assert dksm_group["pool"]["leases"] >= 1  # type: ignore[index]

    door.proc.send_signal(signal.SIGTERM)
    assert door.wait() == 130
    assert not os.path.exists(door.sock)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_bad_requests_get_4xx_and_the_server_keeps_serving(
    front_door: Callable[..., FrontDoor],
) -> None:
    door = front_door()
    body = b'{"kernel_image_path": "hello"}'
    cases = {
        "wrong method": b"DELETE /machine-config HTTP/1.1\r\nHost: x\r\n\r\n",
        "unknown path": b"GET /no/such/thing HTTP/1.1\r\nHost: x\r\n\r\n",
        "not JSON": b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{",
        "empty PUT": b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "GET with a body": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        "not HTTP": b"\x00\x01\x02 hello there\r\n\r\n",
        "bad header": b"PUT /boot-source HTTP/1.1\r\nHost x\r\n\r\n",
        "unknown field": b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\n\r\n"
        b'{"kernel_image_path": "hello", "shiny": 1}  ',
        "path id differs": b"PUT /drives/a HTTP/1.1\r\nHost: x\r\nContent-Length: 41\r\n\r\n"
        b'{"drive_id": "b", "is_root_device": true}',
        "unimplemented": b"GET /balloon HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    for name, request in cases.items():
        answer = door.raw(request)
        assert 400 <= _status(answer) < 500, (name, answer)
    assert b"shiny: unknown field" in door.raw(cases["unknown field"])
    assert b"balloon devices are not supported" in door.raw(cases["unimplemented"])

    huge = b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    assert _status(door.raw(huge + b"{" * 100000)) == 413
    deep = b"[" * 25000 + b"]" * 25000
    nested = b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(deep)
    answer = door.raw(nested + deep)
    assert _status(answer) == 400 and b"nested too deeply" in answer
    long_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 100000 + b"\r\n\r\n"
    assert 400 <= _status(door.raw(long_header)) < 500

    # A client that hangs up mid-request, and one that stalls mid-request while
    # another is served: the first is forgotten, the second answered 408.
    door.raw(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 30\r\n\r\n{", read=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.settimeout(20)
        stalled.connect(door.sock)
        stalled.sendall(b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n{")
        with door.httpx() as api:  # a keep-alive client beside it is served at once
            assert api.get("/").status_code == 200
            assert api.put("/boot-source", content=body).status_code == 204
        assert _status(stalled.recv(65536)) == 408

    with door.httpx() as api:
        assert api.get("/").json()["state"] == "Not started"
        assert api.get("/vm/config").json()["boot-source"]["kernel_image_path"] == "hello"
    assert door.proc.poll() is None


def test_devices_dksm_lacks_are_validated_then_refused_by_name(
    front_door: Callable[..., FrontDoor],
) -> None:
    door = front_door()
    with door.httpx() as api:
        drive = {"drive_id": "rootfs", "path_on_host": "r.ext4", "is_root_device": True}
        answer = api.put("/drives/rootfs", json=drive)
        assert answer.status_code == 400
        assert answer.json()["fault_message"] == (
            "drives: block devices (virtio-blk) are not supported yet"
        )
        malformed = api.put("/drives/rootfs", json={"drive_id": "rootfs", "is_root_device": 1})
        assert (
            "is_root_device: Input should be a valid boolean" in malformed.json()["fault_message"]
        )
        nic = {"iface_id": "eth0", "host_dev_name": "tap0"}
        assert "virtio-net" in api.put("/network-interfaces/eth0", json=nic).text
        assert "vsock" in api.put("/vsock", json={"guest_cid": 3, "uds_path": "/v"}).text
        assert "entropy" in api.put("/entropy", json={}).text
        assert "MMDS" in api.put("/mmds/config", json={"network_interfaces": ["eth0"]}).text
        smt = api.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 16, "smt": True})
        assert smt.status_code == 400 and "smt" in smt.json()["fault_message"]
        pause = api.patch("/vm", json={"state": "Paused"})
        assert "not supported before starting" in pause.json()["fault_message"]
        no_kernel = api.put("/actions", json={"action_type": "InstanceStart"})
        assert no_kernel.status_code == 400
        assert api.put("/dksm", json={"dedup": "none", "domain": "api-test"}).status_code == 204
        assert api.get("/dksm").json()["dedup"] == "none"
        assert api.put("/dksm", json={"dedup": "sideways"}).status_code == 400


def test_config_file_without_api(tmp_path: Path) -> None:
    config = tmp_path / "vm.json"
    config.write_text(
        json.dumps(
            {
                "boot-source": {"kernel_image_path": "hello", "boot_args": "x=1"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
                "dksm": {"dedup": "none"},
            }
        )
    )
    log = tmp_path / "vmm.log"
    ran = subprocess.run(
        [str(FIRECRACKER), "--no-api", "--config-file", str(config), "--boot-timer",
         "--log-path", str(log), "--level", "info"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert 'hello: cmdline="x=1"' in ran.stdout
    assert ran.stderr == ""
    assert "Guest-boot-time = " in log.read_text()


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["--bogus"], 153, "unrecognized arguments"),
        (["--no-api"], 153, "--no-api requires --config-file"),
        (["--level", "Loud"], 152, "--level Loud"),
        (["--id", "no spaces"], 153, "--id"),
        (["--metadata", "m.json"], 153, "MMDS"),
    ],
)
def test_firecrackers_exit_codes_for_bad_arguments(
    tmp_path: Path, args: list[str], status: int, needle: str
) -> None:
    ran = subprocess.run(
        [str(FIRECRACKER), "--api-sock", str(tmp_path / "s"), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == status, ran.stderr
    assert needle in ran.stderr
    assert "Traceback" not in ran.stderr


def test_an_existing_socket_path_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "taken.sock"
    taken.write_text("")
    ran = subprocess.run(
        [str(FIRECRACKER), "--api-sock", str(taken)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 1
    assert "cannot create the API socket" in ran.stderr
    assert taken.read_text() == ""  # left alone


def test_dksm_vmm_is_the_same_front_door(tmp_path: Path) -> None:
    from conftest import dksm

    version = dksm("vmm", "--version")
    assert version.returncode == 0 and "Firecracker-compatible" in version.stdout
    bad = dksm("vmm", "--no-api")
    assert bad.returncode == 153


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.mark.skipif(os.geteuid() != 0, reason="confinement to another user needs root")
def test_front_door_vmm_runs_confined_and_keeps_serving(
    front_door: Callable[..., FrontDoor], asm_guest: AsmGuest
) -> None:
    """Once the VM is started, the VMM behind the socket is another user with no
    capabilities under a seccomp filter, and its API thread still answers (state,
    pause, resume, metrics); the process the client started removes the socket when the
    VMM ends, since the VMM may no longer."""
    door = front_door()
    session = requests_unixsocket.Session()
    url = door.requests_url
    boot = {"kernel_image_path": str(asm_guest("tick_forever"))}
    assert session.put(url("/boot-source"), json=boot).status_code == 204
    assert session.put(url("/actions"), json={"action_type": "InstanceStart"}).status_code == 204
    (vmm,) = [int(p) for p in Path(f"/proc/{door.proc.pid}/task/{door.proc.pid}/children")
              .read_text().split()]  # fmt: skip
    status = _status_fields(vmm)
    assert status["Uid"].split() == ["65534"] * 4
    assert status["CapEff"] == "0000000000000000"
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    assert session.get(url("/")).json()["state"] == "Running"
    assert session.patch(url("/vm"), json={"state": "Paused"}).status_code == 204
    assert session.patch(url("/vm"), json={"state": "Resumed"}).status_code == 204
    assert session.put(url("/actions"), json={"action_type": "FlushMetrics"}).status_code == 204
    assert session.get(url("/machine-config")).status_code == 200
    door.proc.send_signal(signal.SIGTERM)
    assert door.wait() == 130
    assert not os.path.exists(door.sock)
    assert not os.path.exists(f"/proc/{vmm}")
