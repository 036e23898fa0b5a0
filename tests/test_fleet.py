"""Fleets through the real command line: up, status, logs, down; and one VM's
failure (killed, triple fault) leaves the others running and releases its lease."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dksm.dedup.pool import PagePool

from conftest import dksm, requires_kvm, requires_root

pytestmark = [requires_kvm, requires_root]


def status(fleet_id: str) -> dict[str, Any]:
    result = dksm("fleet", "status", fleet_id, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def leases(domain: str) -> int:
    with contextlib.closing(PagePool.open(domain)) as pool:
        return pool.stats().leases


def logs_when(fleet_id: str, vm: int, line: str) -> str:
    """``dksm fleet logs`` once the VM has printed ``line`` (booted means only that
    its first line is out)."""
    text = ""

    def printed() -> bool:
        nonlocal text
        text = dksm("fleet", "logs", fleet_id, str(vm)).stdout
        return line in text.splitlines()

    wait_for(printed)
    return text


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_fleet_up_status_logs_down() -> None:
    up = dksm(
        "fleet",
        "up",
        "--image",
        "idle",
        "--image",
        "hello",
        "--instances",
        "3",
        "--domain",
        "fleet-cli",
        "--boot-args",
        "console=ttyS0 then=idle",
    )
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        doc = status(fleet_id)
        assert doc["supervisor_alive"]
        members = doc["members"]
        assert len(members) == 6
        assert {m["label"] for m in members} == {"idle", "hello"}
        assert all(m["state"] == "running" for m in members), members
        assert all(m["pss_bytes"] > 0 for m in members)
        text = dksm("fleet", "status", fleet_id)
        assert text.returncode == 0 and "running" in text.stdout
        idle_vm = next(m["index"] for m in members if m["label"] == "idle")
        log = logs_when(fleet_id, idle_vm, "idle: ready")
        assert log.splitlines()[:2] == ["idle: dksm guest kit", "idle: ready"]
        assert leases("fleet-cli") == 6
    finally:
        down = dksm("fleet", "down", fleet_id)
    assert down.returncode == 0, down.stderr
    assert "6 VMs stopped" in down.stdout
    assert not status(fleet_id)["supervisor_alive"]
    assert all(m["state"] == "stopped" for m in status(fleet_id)["members"])
    assert leases("fleet-cli") == 0


def test_killed_vm_is_reported_and_the_rest_keep_running() -> None:
    up = dksm(
        "fleet",
        "up",
        "--image",
        "idle",
        "--instances",
        "4",
        "--domain",
        "fleet-kill",
        "--vms-per-process",
        "1",
    )
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        victim = status(fleet_id)["members"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: status(fleet_id)["members"][1]["state"] == "failed")
        members = status(fleet_id)["members"]
        assert "killed by signal SIGKILL" in members[1]["reason"]
        assert [m["state"] for m in members] == ["running", "failed", "running", "running"]
        for m in members:
            if m["state"] == "running":
                os.kill(m["pid"], 0)  # still alive
        wait_for(lambda: leases("fleet-kill") == 3)  # the dead VM's lease was released
    finally:
        dksm("fleet", "down", fleet_id)
    assert leases("fleet-kill") == 0


def test_triple_fault_fails_one_vm_only(asm_guest: Callable[[str], Path]) -> None:
    up = dksm(
        "fleet",
        "up",
        "--image",
        "idle",
        "--image",
        str(asm_guest("triple_fault")),
        "--instances",
        "2",
        "--domain",
        "fleet-fault",
    )
    assert up.returncode == 1  # some VMs failed: said on stderr, fleet still up
    fleet_id = up.stdout.strip()
    try:
        members = status(fleet_id)["members"]
        faulted = [m for m in members if m["label"] == "triple_fault"]
        assert [m["state"] for m in faulted] == ["failed", "failed"]
        assert all("triple fault" in m["reason"] for m in faulted)
        assert "triple fault" in up.stderr
        assert all(m["state"] == "running" for m in members if m["label"] == "idle")
        wait_for(lambda: leases("fleet-fault") == 2)
    finally:
        dksm("fleet", "down", fleet_id)


def test_many_vms_per_process_keep_failures_apart(asm_guest: Callable[[str], Path]) -> None:
    up = dksm(
        "fleet",
        "up",
        "--image",
        "idle",
        "--image",
        str(asm_guest("triple_fault")),
        "--instances",
        "3",
        "--vms-per-process",
        "6",
        "--domain",
        "fleet-shared",
    )
    fleet_id = up.stdout.strip()
    try:
        members = status(fleet_id)["members"]
        assert len({m["pid"] for m in members}) == 1  # one worker hosts all six
        states = {
            m["label"]: {x["state"] for x in members if x["label"] == m["label"]} for m in members
        }
        assert states == {"idle": {"running"}, "triple_fault": {"failed"}}
        wait_for(lambda: leases("fleet-shared") == 3)
    finally:
        down = dksm("fleet", "down", fleet_id)
    assert "6 VMs stopped" in down.stdout
    assert leases("fleet-shared") == 0


def test_sixty_four_vms_answer_status_and_stop_cleanly() -> None:
    up = dksm(
        "fleet", "up", "--image", "idle", "--instances", "64", "--domain", "fleet-64", timeout=180
    )
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        members = status(fleet_id)["members"]
        assert len(members) == 64
        assert all(m["state"] == "running" and m["pss_bytes"] > 0 for m in members)
    finally:
        down = dksm("fleet", "down", fleet_id, timeout=180)
    assert "64 VMs stopped (0 had failed)" in down.stdout
    assert leases("fleet-64") == 0
    assert not any(os.path.exists(f"/proc/{m['pid']}") for m in members)


def test_fleet_down_stops_workers_whose_supervisor_was_killed() -> None:
    up = dksm("fleet", "up", "--image", "idle", "--instances", "4", "--vms-per-process", "2",
              "--domain", "fleet-orphans")  # fmt: skip
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    doc = status(fleet_id)
    workers = {m["pid"] for m in doc["members"]}
    supervisor = json.loads(
        (Path(os.environ["DKSM_RUN_DIR"]) / fleet_id / "fleet.json").read_text()
    )["supervisor_pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not status(fleet_id)["supervisor_alive"])
    for pid in workers:
        os.kill(pid, 0)  # the VMs outlive their supervisor
    # Its state file still says "running": status must not believe a dead writer.
    assert {m["state"] for m in status(fleet_id)["members"]} == {"orphaned"}
    text = dksm("fleet", "status", fleet_id).stdout
    assert " running " not in text and text.count("orphaned") == 4
    down = dksm("fleet", "down", fleet_id)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers))
    wait_for(lambda: leases("fleet-orphans") == 0)  # swept once their owners died
    assert {m["state"] for m in status(fleet_id)["members"]} == {"lost"}


def test_fleet_from_a_firecracker_config(tmp_path: Path) -> None:
    from dksm.guests import guest_path

    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(guest_path("hello")),
                        "boot_args": "console=ttyS0 then=idle from=firecracker"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 24},
        "drives": [], "network-interfaces": [],
    }))  # fmt: skip
    up = dksm("fleet", "up", "--config-file", str(config), "--instances", "3",
              "--domain", "fleet-config")  # fmt: skip
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        members = status(fleet_id)["members"]
        assert [m["label"] for m in members] == ["hello"] * 3
        log = logs_when(fleet_id, 2, "hello: bye")
        assert 'hello: cmdline="console=ttyS0 then=idle from=firecracker"' in log
        assert "e820: 0x0000000000100000-0x00000000017fffff type 1" in log  # 24 MiB
    finally:
        dksm("fleet", "down", fleet_id)
    bad = dksm("fleet", "up", "--instances", "2")
    assert bad.returncode == 1 and "at least one --image or --config-file" in bad.stderr


def test_fleet_of_multi_vcpu_vms_starts_every_cpu_and_stops_cleanly() -> None:
    """Each VM of the fleet has two vCPUs: every guest starts its second CPU (smpprobe
    says so), stays up (then=idle) on both, and `fleet down` stops all of them."""
    up = dksm(
        "fleet", "up", "--image", "smpprobe", "--instances", "3", "--vcpus", "2",
        "--domain", "fleet-smp", "--boot-args", "then=idle",
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        for vm in range(3):
            log = logs_when(fleet_id, vm, "dksm: idle")
            assert "smpprobe: 2 cpus online, counter 2000 ok, wide 20050 ok" in log.splitlines()
        assert [m["state"] for m in status(fleet_id)["members"]] == ["running"] * 3
    finally:
        down = dksm("fleet", "down", fleet_id)
    assert down.returncode == 0, down.stderr
    assert all(m["state"] == "stopped" for m in status(fleet_id)["members"])
    assert leases("fleet-smp") == 0


@pytest.mark.parametrize("vms_per_process", [8, 1])
def test_held_fleet_keeps_vms_whose_guests_shut_down_until_down(vms_per_process: int) -> None:
    """With --hold a guest that shuts down (hello) keeps its memory and its pool
    pages until `fleet down`; then its VM ends as the guest ended, status 0.  With
    one VM per worker the guest's shutdown ends the vCPU loop on the worker's main
    thread, which then holds the VM the same way."""
    domain = f"fleet-hold-{vms_per_process}"
    up = dksm(
        "fleet", "up", "--image", "hello", "--instances", "2", "--hold", "--domain", domain,
        "--vms-per-process", str(vms_per_process),
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        wait_for(lambda: [m["state"] for m in status(fleet_id)["members"]] == ["held"] * 2)
        members = status(fleet_id)["members"]
        assert all("guest requested shutdown" in m["reason"] for m in members)
        assert all(m["pss_bytes"] > 0 for m in members)  # still mapped
        assert len({m["pid"] for m in members}) == (2 if vms_per_process == 1 else 1)
        assert leases(domain) == 2
    finally:
        down = dksm("fleet", "down", fleet_id)
    assert down.returncode == 0, down.stderr
    assert [m["state"] for m in status(fleet_id)["members"]] == ["exited"] * 2
    assert leases(domain) == 0


def test_worker_info_file_says_what_its_vm_is(tmp_path: Path) -> None:
    """Workers fill a template the supervisor made: the file must hold the same
    facts `dksm run --info-file` would, whatever characters the kernel's path has."""
    from dksm.fleet import control
    from dksm.fleet.instance import DedupMode, InstanceSpec
    from dksm.guests import resolve_image
    from dksm.vmm.config import DEFAULT_BOOT_ARGS, VmConfig

    kernel = tmp_path / 'odd "%d %s" name' / "idle"
    kernel.parent.mkdir()
    kernel.write_bytes(resolve_image("idle").read_bytes())
    config = VmConfig(
        kernel_path=str(kernel), mem_mib=16, boot_args=f"{DEFAULT_BOOT_ARGS} then=idle"
    )
    spec = InstanceSpec(config, DedupMode.DKSM, "fleet-info")
    handle = control.up([("idle", spec)] * 2, vms_per_worker=1)
    try:
        for member in handle.members():
            info = handle.info(member.index)
            assert info.pid == member.pid
            assert (info.kernel, info.mem_size) == (str(kernel), 16 << 20)
            assert (info.dedup, info.ksm_scope, info.domain) == ("dksm", "ram", "fleet-info")
            assert info.pages_shared > 0
            maps = Path(f"/proc/{member.pid}/maps").read_text().splitlines()
            starts = {int(line.split("-")[0], 16) for line in maps}
            assert info.ram_host_address in starts
    finally:
        handle.down()
    assert leases("fleet-info") == 0


def test_one_vm_workers_run_it_on_their_only_thread_and_stop_on_sigterm() -> None:
    """A worker hosting one VM of one vCPU runs the vCPU on its main thread: it has
    one thread of its own, and SIGTERM (sent to one worker, then `fleet down` to the rest)
    still stops its guest, halted inside KVM_RUN, as an interrupted VM."""
    up = dksm(
        "fleet", "up", "--image", "idle", "--instances", "3", "--vms-per-process", "1",
        "--domain", "fleet-alone",
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        members = status(fleet_id)["members"]
        for m in members:
            logs_when(fleet_id, m["index"], "idle: ready")
            tasks = Path(f"/proc/{m['pid']}/task").iterdir()
            names = [(task / "comm").read_text().strip() for task in tasks]
            # KVM's own worker (NX huge page recovery) counts among the process's tasks.
            assert len([n for n in names if not n.startswith("kvm-")]) == 1, names
        os.kill(members[0]["pid"], signal.SIGTERM)
        wait_for(lambda: status(fleet_id)["members"][0]["state"] == "stopped")
        after = status(fleet_id)["members"]
        assert "fleet stopped (SIGTERM)" in after[0]["reason"]
        assert [m["state"] for m in after[1:]] == ["running", "running"]
    finally:
        down = dksm("fleet", "down", fleet_id)
    assert down.returncode == 0, down.stderr
    final = status(fleet_id)["members"]
    assert [m["state"] for m in final] == ["stopped"] * 3
    assert all("fleet stopped (SIGTERM)" in m["reason"] for m in final)
    assert leases("fleet-alone") == 0
    assert not any(os.path.exists(f"/proc/{m['pid']}") for m in members)
