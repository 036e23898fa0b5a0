"""The supervisor process of one fleet: forks the members, keeps ``fleet.json``
current, and on SIGTERM stops every member and releases their pool leases.  Once
every member has ended (and none is held) there is nothing left to supervise: it
records the fleet as stopped and ends."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import FrameType

from dksm.dedup.owner import ProcessIdentity
from dksm.fleet.control import (
    SPEC_FILE,
    STATE_FILE,
    confinement_from_json,
    spec_from_json,
    write_json_atomically,
)
from dksm.fleet.launcher import DEFAULT_VMS_PER_WORKER, FleetError, FleetLauncher


class _StopFlag:
    def __init__(self) -> None:
        self.set = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.set = True


def supervise(directory: Path) -> int:
    doc = json.loads((directory / SPEC_FILE).read_text())
    specs = [spec_from_json(m) for m in doc["members"]]
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    launcher = FleetLauncher(
        directory,
        int(doc.get("vms_per_worker", DEFAULT_VMS_PER_WORKER)),
        hold=bool(doc.get("hold", False)),
        confinement=confinement_from_json(doc.get("confine")),
    )
    state: dict[str, object] = {
        "id": directory.name,
        "supervisor_pid": os.getpid(),
        "supervisor_start_time": ProcessIdentity.current().start_time,  # pid reuse
        "created": time.time(),
        "booted": False,
        "stopped": False,
        "error": "",
    }

    def publish() -> None:
        state["members"] = launcher.snapshot()
        write_json_atomically(directory / STATE_FILE, state)

    launcher.launch(specs)
    publish()
    try:
        launcher.wait_booted(float(doc.get("boot_timeout", 120)))
        state["booted"] = True
        state["booted_at"] = time.time()
    except FleetError as exc:
        state["error"] = str(exc)
    publish()
    last = launcher.snapshot()
    while not stop.set and launcher.alive():
        launcher.poll(0.5)
        now = launcher.snapshot()
        if now != last:
            publish()
            last = now
    launcher.stop_all()
    launcher.close()
    state["stopped"] = True
    publish()
    return 0
