"""A fleet's directory: the name of every file in it, and the records those files hold.

The supervisor, its workers and every command that inspects a fleet meet only
through these files, so their names and contents are declared here once:

``spec.json``
    what ``fleet up`` asked for (written once, before the supervisor starts);
``fleet.json``
    the supervisor's :class:`FleetState`, replaced atomically at every change;
``supervisor.log``
    the supervisor's own output;
``vm-N.log``
    VM N's console;
``vm-N.outcome.json``
    how VM N ended (:class:`VmOutcome`), empty until it has;
``vm-N.info.json``
    what VM N's process published about itself (:class:`VmInfo`);
``worker-PID.error``
    the traceback of a worker that failed outside any VM.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"
STATE_FILE = "fleet.json"
SUPERVISOR_LOG = "supervisor.log"

# Member states in which the VM still holds memory (and its worker is alive).
LIVE_STATES = ("booting", "running", "held")


@dataclass
class Member:
    """One VM of a fleet, as the supervisor tracks and publishes it."""

    index: int
    label: str
    pid: int
    state: str  # booting, running, held, exited, failed, stopped (orphaned, lost: judged)
    started_at: float
    booted_at: float | None = None
    ended_at: float | None = None
    reason: str = ""

    @property
    def log_name(self) -> str:
        return FleetDirectory.vm_log_name(self.index)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Member:
        return cls(**doc)


@dataclass
class FleetState:
    """The supervisor's ``fleet.json``; a fleet whose supervisor has not written it
    yet reads as this class's defaults."""

    id: str = ""
    supervisor_pid: int | None = None
    supervisor_start_time: int | None = None  # with the pid: pid reuse is not identity
    created: float = 0.0
    booted: bool = False
    stopped: bool = False
    error: str = ""
    booted_at: float | None = None
    members: list[Member] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        if self.booted_at is None:
            del doc["booted_at"]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FleetState:
        members = [Member.from_json(m) for m in doc.get("members", [])]
        return cls(**{**doc, "members": members})


@dataclass(frozen=True)
class VmOutcome:
    """How a fleet VM ended, as its worker wrote it."""

    cause: str
    detail: str
    status: int  # the VM's exit status (dksm.vmm.exit_status.ExitStatus)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def reason(self) -> str:
        return f"{self.cause}: {self.detail}".rstrip(": ")


@dataclass(frozen=True)
class VmInfo:
    """What a VM's process publishes about itself, for tools that inspect it (its
    guest RAM through /proc/PID/mem, say)."""

    pid: int
    kernel: str
    mem_size: int
    ram_host_address: int
    dedup: str
    ksm_scope: str
    domain: str
    pages_shared: int

    def to_json(self) -> dict[str, Any]:
        # Not asdict(): a fleet worker writes this, and each page of code and objects
        # it runs is copied into the worker (asdict's recursion is a few dozen).
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> VmInfo:
        return cls(**doc)

    @classmethod
    def template(cls, **known: object) -> bytes:
        """The JSON of an info whose fields other than :data:`PROCESS_FIELDS` are
        ``known``, with each of those left as ``%d``, to be filled by bytes formatting
        in :data:`PROCESS_FIELDS`' order: a fleet supervisor makes it, so that each
        worker formats three integers rather than running the JSON encoder."""
        parts = []
        for name in (f.name for f in fields(cls)):
            if name in PROCESS_FIELDS:
                value = b"%d"
            else:
                value = json.dumps(known[name]).encode().replace(b"%", b"%%")
            parts.append(json.dumps(name).encode() + b": " + value)
        return b"{" + b", ".join(parts) + b"}"


# What only a VM's own process knows of its info (see VmInfo.template), in that order.
PROCESS_FIELDS = ("pid", "ram_host_address", "pages_shared")


def write_json_atomically(path: Path, doc: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


class FleetDirectory:
    """The files of one fleet, by name, and their typed reads and writes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def vm_log_name(index: int) -> str:
        return f"vm-{index}.log"

    @property
    def spec_file(self) -> Path:
        return self.path / SPEC_FILE

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def supervisor_log(self) -> Path:
        return self.path / SUPERVISOR_LOG

    def vm_log(self, index: int) -> Path:
        return self.path / self.vm_log_name(index)

    def vm_outcome(self, index: int) -> Path:
        return self.path / f"vm-{index}.outcome.json"

    def vm_info(self, index: int) -> Path:
        return self.path / f"vm-{index}.info.json"

    def worker_error(self, pid: int) -> Path:
        return self.path / f"worker-{pid}.error"

    def is_fleet(self) -> bool:
        """Whether a fleet was ever started here (its spec is the first file written)."""
        return self.spec_file.exists()

    def write_spec(self, doc: dict[str, Any]) -> None:
        write_json_atomically(self.spec_file, doc)

    def read_spec(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.spec_file.read_text())
        return doc

    def write_state(self, state: FleetState) -> None:
        write_json_atomically(self.state_file, state.to_json())

    def read_state(self) -> FleetState:
        """The state file; raises FileNotFoundError before the supervisor wrote it and
        ValueError (or TypeError) when it is not a fleet state."""
        return FleetState.from_json(json.loads(self.state_file.read_text()))

    def read_outcome(self, index: int) -> VmOutcome | None:
        """VM ``index``'s outcome, or None if it wrote none (or not a whole one)."""
        try:
            doc = json.loads(self.vm_outcome(index).read_text())
            return VmOutcome(str(doc["cause"]), str(doc["detail"]), int(doc["status"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def read_info(self, index: int) -> VmInfo:
        return VmInfo.from_json(json.loads(self.vm_info(index).read_text()))
