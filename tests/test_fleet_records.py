"""A fleet's life as a new user sees it: its supervisor ends once every VM has ended,
`fleet list` shows it stopped, `fleet logs` finds the newest fleet by itself, `fleet
down` of a stopped fleet says so, and `fleet prune` removes its record."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import dksm, requires_kvm, requires_root

pytestmark = [requires_kvm, requires_root]


def test_a_fleet_of_guests_that_shut_down_ends_by_itself_and_can_be_pruned() -> None:
    up = dksm("fleet", "up", "--image", "hello", "--instances", "2", "--domain", "fleet-records")
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    deadline = time.monotonic() + 60
    while True:
        doc = json.loads(dksm("fleet", "status", fleet_id, "--json").stdout)
        if not doc["supervisor_alive"]:
            break
        assert time.monotonic() < deadline, "the supervisor outlived its VMs"
        time.sleep(0.2)
    assert [m["state"] for m in doc["members"]] == ["exited", "exited"]

    listed = dksm("fleet", "list")
    assert listed.stdout.splitlines()[0].split()[:3] == ["fleet", "state", "VMs"]
    row = next(line for line in listed.stdout.splitlines() if line.startswith(fleet_id))
    assert row.split()[1:3] == ["stopped", "2"] and "2 exited" in row

    logs = dksm("fleet", "logs", "1")  # no id: the newest fleet
    assert logs.returncode == 0, logs.stderr
    assert "hello: bye" in logs.stdout
    assert dksm("fleet", "logs", fleet_id, "1").stdout == logs.stdout

    down = dksm("fleet", "down", fleet_id)
    assert down.returncode == 0
    assert down.stdout.strip() == f"fleet {fleet_id} is already stopped (2 VMs, none running)"

    pruned = dksm("fleet", "prune")
    assert pruned.returncode == 0 and fleet_id in pruned.stdout
    assert fleet_id not in dksm("fleet", "list").stdout
    missing = dksm("fleet", "status", fleet_id)
    assert missing.returncode == 1 and "no fleet with id" in missing.stderr


def test_fleet_up_takes_the_config_files_dksm_object_and_refuses_its_logger(
    tmp_path: Path,
) -> None:
    config = tmp_path / "vm.json"
    doc = {
        "boot-source": {"kernel_image_path": "idle"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 16},
        "dksm": {"dedup": "none", "domain": "fleet-dksm-object"},
    }
    config.write_text(json.dumps(doc))
    up = dksm("fleet", "up", "--config-file", str(config), "--instances", "2")
    assert up.returncode == 0, up.stderr
    fleet_id = up.stdout.strip()
    try:
        spec = json.loads((Path(os.environ["DKSM_RUN_DIR"]) / fleet_id / "spec.json").read_text())
        assert {(m["dedup"], m["domain"]) for m in spec["members"]} == {
            ("none", "fleet-dksm-object")
        }
    finally:
        dksm("fleet", "down", fleet_id)
    config.write_text(json.dumps({**doc, "logger": {"log_path": str(tmp_path / "log")}}))
    refused = dksm("fleet", "up", "--config-file", str(config))
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"dksm: error: config file {config}: logger: the log file is written by "
        "'dksm vmm' (dksm-firecracker) only"
    ]
