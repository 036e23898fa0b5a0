"""The supervisor process of one fleet: forks the members, keeps ``fleet.json``
current, and on SIGTERM stops every member and releases their pool leases.  Once
every member has ended (and none is held) there is nothing left to supervise: it
records the fleet as stopped and ends."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from types import FrameType

from dksm.dedup.owner import ProcessIdentity
from dksm.fleet.control import confinement_from_json, spec_from_json
from dksm.fleet.directory import FleetDirectory, FleetState
from dksm.fleet.launcher import DEFAULT_VMS_PER_WORKER, FleetError, FleetLauncher

PR_SET_PDEATHSIG = 1  # prctl(2), linux/prctl.h


class _StopFlag:
    def __init__(self) -> None:
        self.set = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.set = True


def _stop_with_parent(parent_pid: int, stop: _StopFlag) -> None:
    """Have the kernel send SIGTERM when the process that started the fleet dies;
    if it died before this call, stop now."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:
        stop.set = True


def supervise(directory: Path) -> int:
    files = FleetDirectory(directory)
    doc = files.read_spec()
    specs = [spec_from_json(m) for m in doc["members"]]
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if doc.get("parent_pid"):
        _stop_with_parent(int(doc["parent_pid"]), stop)
    launcher = FleetLauncher(
        files,
        int(doc.get("vms_per_worker", DEFAULT_VMS_PER_WORKER)),
        hold=bool(doc.get("hold", False)),
        confinement=confinement_from_json(doc.get("confine")),
    )
    state = FleetState(
        id=directory.name,
        supervisor_pid=os.getpid(),
        supervisor_start_time=ProcessIdentity.current().start_time,  # pid reuse
        created=time.time(),
    )

    def publish() -> None:
        state.members = launcher.snapshot()
        files.write_state(state)

    launcher.launch(specs)
    publish()
    try:
        launcher.wait_booted(float(doc.get("boot_timeout", 120)))
        state.booted = True
        state.booted_at = time.time()
    except FleetError as exc:
        state.error = str(exc)
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
    state.stopped = True
    publish()
    return 0
