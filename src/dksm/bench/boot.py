"""Boot latency: from starting a ``dksm run`` process to the guest's first serial
byte, and to the process's exit.

Each run is a fresh interpreter, as a user's ``dksm run`` is, so interpreter
start-up and imports count: they are part of what a microVM costs to start.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from dksm.error import DksmError


class BootBenchError(DksmError):
    """A benchmark run did not boot as expected."""


@dataclass(frozen=True)
class BootResult:
    guest: str
    runs: int
    first_byte_ms: tuple[float, ...]
    exit_ms: tuple[float, ...]

    @staticmethod
    def _summary(values: tuple[float, ...]) -> dict[str, float]:
        return {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        }

    def to_json(self) -> dict[str, object]:
        first = self._summary(self.first_byte_ms)
        done = self._summary(self.exit_ms)
        return {
            "guest": self.guest,
            "runs": self.runs,
            "first_byte_ms_median": first["median"],
            "exit_ms_median": done["median"],
            "first_byte_ms": first,
            "exit_ms": done,
        }

    def table(self) -> str:
        rows = [
            f"boot of '{self.guest}', {self.runs} runs (ms)",
            "            median    min    max  stdev",
        ]
        for name, values in (("first byte", self.first_byte_ms), ("exit", self.exit_ms)):
            s = self._summary(values)
            rows.append(
                f"{name:>10}  {s['median']:7.1f} {s['min']:6.1f} {s['max']:6.1f} {s['stdev']:6.1f}"
            )
        return "\n".join(rows)


def _one_run(guest: str, mem_mib: int) -> tuple[float, float]:
    cmd = [
        sys.executable,
        "-m",
        "dksm",
        "run",
        "--kernel",
        guest,
        "--mem-mib",
        str(mem_mib),
        "--timeout",
        "30",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_at = time.perf_counter()
    proc.stdout.read()
    _, err = proc.communicate()
    done_at = time.perf_counter()
    if not first or proc.returncode != 0:
        reason = err.decode(errors="replace").strip()
        raise BootBenchError(f"run of {guest} exited with status {proc.returncode}: {reason}")
    return (first_at - start) * 1000, (done_at - start) * 1000


def measure_boot(guest: str, runs: int, mem_mib: int = 16) -> BootResult:
    if runs < 1:
        raise BootBenchError(f"--runs must be at least 1, not {runs}")
    _one_run(guest, mem_mib)  # warm the page cache and bytecode cache
    samples = [_one_run(guest, mem_mib) for _ in range(runs)]
    return BootResult(
        guest=guest,
        runs=runs,
        first_byte_ms=tuple(s[0] for s in samples),
        exit_ms=tuple(s[1] for s in samples),
    )
