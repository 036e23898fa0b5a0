"""Fleets on disk: where they live, how they are started, inspected and stopped.

A fleet is a directory under the runtime root (``DKSM_RUN_DIR``, else
``/run/dksm/fleets`` for root, else the user's runtime directory) holding the
fleet's spec, the supervisor's state file (``fleet.json``, replaced atomically),
and each member's console log.  ``up`` starts a supervisor in its own session, so
the fleet outlives the command that started it, and returns once every VM booted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dksm.dedup.owner import ProcessIdentity
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.fleet.launcher import DEFAULT_VMS_PER_WORKER, LIVE_STATES, FleetError
from dksm.vmm.config import VmConfig
from dksm.vmm.confinement import Confinement, Credentials, credentials

SPEC_FILE = "spec.json"
STATE_FILE = "fleet.json"
SUPERVISOR_LOG = "supervisor.log"


def runtime_root() -> Path:
    env = os.environ.get("DKSM_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/dksm/fleets")
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dksm-{os.geteuid()}"
    return Path(base) / "dksm" / "fleets"


def spec_to_json(label: str, spec: InstanceSpec) -> dict[str, Any]:
    return {
        "label": label,
        "config": asdict(spec.config),
        "dedup": spec.dedup.value,
        "domain": spec.domain,
        "pool_root": None if spec.pool_root is None else str(spec.pool_root),
    }


def spec_from_json(doc: dict[str, Any]) -> tuple[str, InstanceSpec]:
    root = doc.get("pool_root")
    return doc["label"], InstanceSpec(
        config=VmConfig(**doc["config"]),
        dedup=DedupMode(doc["dedup"]),
        domain=doc["domain"],
        pool_root=None if root is None else Path(root),
    )


def confinement_to_json(target: Credentials | None) -> dict[str, int] | None:
    return None if target is None else {"uid": target.uid, "gid": target.gid}


def confinement_from_json(doc: dict[str, int] | None) -> Confinement | None:
    return None if doc is None else Confinement(Credentials(int(doc["uid"]), int(doc["gid"])))


def write_json_atomically(path: Path, doc: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _new_fleet_id(root: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        candidate = f"{stamp}-{n}" if n else stamp
        if not (root / candidate).exists():
            return candidate
    raise FleetError(f"cannot find a free fleet id under {root}")


def _supervisor_pid(state: dict[str, Any]) -> int | None:
    pid = state.get("supervisor_pid")
    return int(pid) if pid else None


def _supervisor_alive(state: dict[str, Any]) -> bool:
    """Whether the process that wrote ``state`` still runs: its pid *and* start time,
    since a killed supervisor's pid may be handed to any other process."""
    pid = _supervisor_pid(state)
    start_time = state.get("supervisor_start_time")
    if pid is None or start_time is None:
        return False
    return ProcessIdentity(pid, int(start_time)).is_alive()


def _live_pids(state: dict[str, Any]) -> list[int]:
    """Processes the state file says host live VMs (its writer may be dead)."""
    pids = [m["pid"] for m in state.get("members", []) if m["state"] in LIVE_STATES]
    return list(dict.fromkeys(pids))


# Member states a fleet whose supervisor died shows instead of "booting"/"running":
# nobody watches these VMs any more, and `down` stops those still running.
ORPHANED = "orphaned"
LOST = "lost"


class FleetHandle:
    """A fleet seen from outside its supervisor."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.id = directory.name

    def state(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.directory / STATE_FILE).read_text())
        except FileNotFoundError:
            return {"members": [], "booted": False, "stopped": False}
        except ValueError as exc:
            raise FleetError(f"fleet {self.id}: state file is unreadable: {exc}") from exc
        return doc

    @property
    def supervisor_pid(self) -> int | None:
        return _supervisor_pid(self.state())

    def supervisor_alive(self) -> bool:
        return _supervisor_alive(self.state())

    def members(self) -> list[dict[str, Any]]:
        """Each VM as its supervisor last published it -- or, if the supervisor is
        dead, as it is now: ``orphaned`` while its worker runs, else ``lost``."""
        state = self.state()
        members: list[dict[str, Any]] = state.get("members", [])
        if _supervisor_alive(state):
            return members
        orphans = set(self._orphans(state))
        judged = []
        for m in members:
            if m["state"] in LIVE_STATES:
                if m["pid"] in orphans:
                    m = {**m, "state": ORPHANED, "reason": "supervisor died; `fleet down` stops it"}
                else:
                    m = {**m, "state": LOST, "reason": "supervisor died, and so did this VM"}
            judged.append(m)
        return judged

    def live_pids(self) -> list[int]:
        """Processes hosting live VMs, each once (a worker may host several VMs)."""
        return _live_pids(self.state())

    def process_pids(self) -> list[int]:
        """The supervisor and its live members: every process the fleet costs (one
        read of the state file: this runs on every sample of an experiment)."""
        state = self.state()
        supervisor = _supervisor_pid(state)
        alive = supervisor is not None and _supervisor_alive(state)
        return ([supervisor] if alive and supervisor else []) + _live_pids(state)

    def log_path(self, index: int) -> Path:
        return self.directory / f"vm-{index}.log"

    def info(self, index: int) -> dict[str, Any]:
        """What the VM's process published about itself (pid, RAM address, mode)."""
        doc: dict[str, Any] = json.loads((self.directory / f"vm-{index}.info.json").read_text())
        return doc

    def down(self, timeout: float = 60.0) -> dict[str, Any]:
        """Stop every member and the supervisor; return the final state."""
        pid = self.supervisor_pid
        if pid is not None and self.supervisor_alive():
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.supervisor_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.supervisor_alive():
                raise FleetError(f"fleet {self.id}: supervisor {pid} did not stop in {timeout:g} s")
        self._stop_orphans(timeout)
        return self.state()

    def over(self) -> bool:
        """Nothing of the fleet runs any more: no supervisor, no VM process."""
        return not self.supervisor_alive() and not self._orphans()

    def _orphans(self, state: dict[str, Any] | None = None) -> list[int]:
        """Workers still running without their supervisor (it was killed): forked
        from it, they carry its command line, which tells them from a reused pid."""
        found = []
        for pid in _live_pids(self.state() if state is None else state):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"supervise" in cmdline and str(self.directory).encode() in cmdline:
                found.append(pid)
        return found

    def _stop_orphans(self, timeout: float) -> None:
        orphans = self._orphans()
        if not orphans:
            return
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # each stops its VMs; the sweep frees leases
        deadline = time.monotonic() + timeout
        while self._orphans() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self._orphans():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def up(
    specs: Sequence[tuple[str, InstanceSpec]],
    *,
    boot_timeout: float = 120.0,
    vms_per_worker: int = DEFAULT_VMS_PER_WORKER,
    root: Path | None = None,
    hold: bool = False,
    confine_as: Credentials | None = None,
    no_confine: bool = False,
) -> FleetHandle:
    """Start a supervisor for ``specs`` and return once every VM has booted.

    ``hold`` keeps each VM whose guest shuts down mapped, as it was at its end,
    until the fleet is stopped (state ``held``).  Workers are confined (as
    ``confine_as``, by default the ids :func:`dksm.vmm.confinement.credentials`
    picks) unless ``no_confine``."""
    if not specs:
        raise FleetError("a fleet needs at least one instance")
    target = None if no_confine else confine_as or credentials()
    root = root or runtime_root()
    root.mkdir(parents=True, exist_ok=True)
    fleet_id = _new_fleet_id(root)
    directory = root / fleet_id
    directory.mkdir()
    write_json_atomically(
        directory / SPEC_FILE,
        {
            "boot_timeout": boot_timeout,
            "vms_per_worker": vms_per_worker,
            "hold": hold,
            "confine": confinement_to_json(target),
            "members": [spec_to_json(label, s) for label, s in specs],
        },
    )
    with open(directory / SUPERVISOR_LOG, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dksm", "fleet", "supervise", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    handle = FleetHandle(directory)
    try:
        return _wait_until_booted(handle, proc, boot_timeout)
    except BaseException:  # a failed or interrupted start leaves no fleet behind
        handle.down()
        raise


def _wait_until_booted(
    handle: FleetHandle, proc: subprocess.Popen[bytes], boot_timeout: float
) -> FleetHandle:
    deadline = time.monotonic() + boot_timeout + 30
    while True:
        state = handle.state()
        if state.get("error"):
            raise FleetError(f"fleet {handle.id}: {state['error']}")
        if state.get("booted"):
            return handle
        code = proc.poll()
        if code is not None:
            log_text = (handle.directory / SUPERVISOR_LOG).read_text(errors="replace").strip()
            last = log_text.splitlines()[-1] if log_text else f"exit status {code}"
            raise FleetError(f"fleet {handle.id}: supervisor ended before boot: {last}")
        if time.monotonic() > deadline:
            raise FleetError(f"fleet {handle.id}: not booted after {boot_timeout:g} s")
        time.sleep(0.05)


def all_fleets(root: Path | None = None) -> list[FleetHandle]:
    """Every fleet recorded under the runtime root, oldest first."""
    root = root or runtime_root()
    if not root.is_dir():
        return []
    return [FleetHandle(d) for d in sorted(root.glob("*")) if (d / SPEC_FILE).exists()]


def prune(root: Path | None = None) -> list[str]:
    """Remove the records of fleets that are over (no supervisor, no VM process left);
    the ids removed."""
    import shutil

    removed = []
    for handle in all_fleets(root):
        if not handle.over():
            continue
        shutil.rmtree(handle.directory)
        removed.append(handle.id)
    return removed


def find(fleet_id: str | None, root: Path | None = None) -> FleetHandle:
    """The named fleet, or the only/newest live one when no id is given."""
    root = root or runtime_root()
    if fleet_id:
        directory = root / fleet_id
        if not (directory / SPEC_FILE).exists():
            raise FleetError(f"no fleet with id '{fleet_id}' under {root}")
        return FleetHandle(directory)
    fleets = all_fleets(root)
    live = [f for f in fleets if f.supervisor_alive()]
    if live:
        return live[-1]
    if fleets:
        return fleets[-1]
    raise FleetError(f"no fleet found under {root}")
