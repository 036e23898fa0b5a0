"""A fleet's files as the supervisor writes them and the commands read them: names
in one place, records that survive the round trip, and files not (yet) whole."""

from __future__ import annotations

import json
from pathlib import Path

from dksm.fleet.directory import (
    FleetDirectory,
    FleetState,
    Member,
    VmInfo,
    VmOutcome,
)


def test_every_file_of_a_fleet_is_named_here(tmp_path: Path) -> None:
    files = FleetDirectory(tmp_path)
    assert files.spec_file == tmp_path / "spec.json"
    assert files.state_file == tmp_path / "fleet.json"
    assert files.supervisor_log == tmp_path / "supervisor.log"
    assert files.vm_log(3) == tmp_path / "vm-3.log"
    assert files.vm_outcome(3) == tmp_path / "vm-3.outcome.json"
    assert files.vm_info(3) == tmp_path / "vm-3.info.json"
    assert files.worker_error(4242) == tmp_path / "worker-4242.error"
    assert Member(3, "idle", 1, "running", 0.0).log_name == files.vm_log(3).name


def test_state_round_trips_through_the_state_file(tmp_path: Path) -> None:
    files = FleetDirectory(tmp_path)
    state = FleetState(id="f1", supervisor_pid=10, supervisor_start_time=99, created=1.5)
    state.members = [Member(0, "hello", 11, "booting", 2.0), Member(1, "idle", 11, "running", 2.0)]
    files.write_state(state)
    assert "booted_at" not in json.loads(files.state_file.read_text())  # as before boot
    assert files.read_state() == state
    state.booted, state.booted_at = True, 3.0
    files.write_state(state)
    assert files.read_state() == state
    assert not list(tmp_path.glob("*.tmp"))  # written beside, then renamed


def test_an_outcome_not_yet_written_or_garbled_reads_as_none(tmp_path: Path) -> None:
    files = FleetDirectory(tmp_path)
    assert files.read_outcome(0) is None
    files.vm_outcome(0).write_text("")  # opened at build, written at the end
    assert files.read_outcome(0) is None
    files.vm_outcome(0).write_text('["cause"]')
    assert files.read_outcome(0) is None
    files.vm_outcome(0).write_text(json.dumps(VmOutcome("timeout", "", 5).to_json()))
    outcome = files.read_outcome(0)
    assert outcome == VmOutcome("timeout", "", 5)
    assert outcome is not None and outcome.reason == "timeout"
    assert VmOutcome("triple fault", "at rip 0x1000", 3).reason == "triple fault: at rip 0x1000"


def test_vm_info_reads_what_the_vm_published(tmp_path: Path) -> None:
    files = FleetDirectory(tmp_path)
    info = VmInfo(12, "/k/hello.elf", 16 << 20, 0x7F00_0000_0000, "dksm", "ram", "default", 40)
    files.vm_info(2).write_text(json.dumps(info.to_json()))
    assert files.read_info(2) == info


def test_a_directory_is_a_fleet_once_its_spec_is_written(tmp_path: Path) -> None:
    files = FleetDirectory(tmp_path)
    assert not files.is_fleet()
    files.write_spec({"members": []})
    assert files.is_fleet() and files.read_spec() == {"members": []}
