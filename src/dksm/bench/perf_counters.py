"""Hardware performance counters of a measured process, through ``perf stat``.

The DKSM thesis ran each measured VMM under ``perf stat`` for cycles, instructions,
cache misses and dTLB/iTLB loads and misses, to see whether merged pages slow a guest
down.  Those counters exist only where the CPU's PMU reaches this kernel: a VM without
a virtual PMU (such as the machines this project is measured on) has none, and
``perf stat`` then reports ``<not supported>`` for every one of them.  This module
finds out which are there (:func:`probe`), wraps a command so that ``perf stat``
counts them (:func:`command`), and reads its CSV output back (:func:`read`).  The
software counts the thesis also took (faults, context switches, user and system
time) do not need ``perf``: the kernel's ``wait4`` reports them for any child.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# The thesis's hardware events, by perf's generic names.
HARDWARE_EVENTS: Final = (
    "cycles",
    "instructions",
    "cache-misses",
    "dTLB-loads",
    "dTLB-load-misses",
    "iTLB-loads",
    "iTLB-load-misses",
)
_NOT_COUNTED: Final = ("<not supported>", "<not counted>")


@dataclass(frozen=True)
class PerfProbe:
    """Which events ``perf stat`` can count here, and if none, why not."""

    events: tuple[str, ...]
    reason: str  # "" when events were found

    @property
    def available(self) -> bool:
        return bool(self.events)


def probe(events: Sequence[str] = HARDWARE_EVENTS) -> PerfProbe:
    """Ask ``perf stat`` to count ``events`` over ``true`` and keep those it counted."""
    perf = shutil.which("perf")
    if perf is None:
        return PerfProbe((), "perf is not installed (Debian: linux-perf), so no hardware counters")
    with tempfile.TemporaryDirectory(prefix="dksm-perf-") as scratch:
        out = Path(scratch) / "stat.csv"
        try:
            done = subprocess.run(
                command(["true"], events, out), capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return PerfProbe((), f"perf stat could not run ({error})")
        if done.returncode != 0 or not out.exists():
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return PerfProbe((), f"perf stat failed: {last}")
        counted = tuple(name for name, value in read(out).items() if value is not None)
    if counted:
        return PerfProbe(counted, "")
    return PerfProbe(
        (),
        "perf stat counts none of the hardware events here (<not supported>): this "
        "machine exposes no hardware performance counters (a VM without a virtual PMU)",
    )


def command(argv: Sequence[str], events: Sequence[str], out: Path) -> list[str]:
    """``argv`` run under ``perf stat``, counting ``events`` into ``out`` as CSV."""
    return ["perf", "stat", "-x", ",", "-o", os.fspath(out), "-e", ",".join(events), "--", *argv]


def read(out: Path) -> dict[str, int | None]:
    """Event -> count from ``perf stat -x ,`` output; None where it counted nothing."""
    counts: dict[str, int | None] = {}
    for line in out.read_text().splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#"):
            continue
        value, event = fields[0], fields[2]
        # Events may carry a PMU or modifier suffix ("cycles:u", "cpu/cycles/").
        name = event.split(":")[0]
        if value in _NOT_COUNTED or not value:
            counts[name] = None
            continue
        try:
            counts[name] = int(float(value))
        except ValueError:
            counts[name] = None
    return counts
