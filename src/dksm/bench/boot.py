"""Boot latency: from starting a ``dksm run`` process to the guest's first serial
byte, and to the process's exit.

Each run is a fresh interpreter, as a user's ``dksm run`` is, so interpreter
start-up and imports count: they are part of what a microVM costs to start.

:func:`compare_confinement` says what confinement (``dksm run`` versus
``dksm run --no-confine``) costs: runs of both kinds alternate, so that whatever
else the host does falls on both alike.
"""

from __future__ import annotations

import os
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
    dedup: str
    first_byte_ms: tuple[float, ...]
    exit_ms: tuple[float, ...]
    confined: bool = True

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
            "dedup": self.dedup,
            "confined": self.confined,
            "first_byte_ms_median": first["median"],
            "exit_ms_median": done["median"],
            "first_byte_ms": first,
            "exit_ms": done,
        }

    def table(self) -> str:
        rows = [
            f"boot of '{self.guest}' (dedup {self.dedup}, "
            f"{'confined' if self.confined else 'not confined'}), {self.runs} runs (ms)",
            "            median    min    max  stdev",
        ]
        for name, values in (("first byte", self.first_byte_ms), ("exit", self.exit_ms)):
            s = self._summary(values)
            rows.append(
                f"{name:>10}  {s['median']:7.1f} {s['min']:6.1f} {s['max']:6.1f} {s['stdev']:6.1f}"
            )
        return "\n".join(rows)


def _installed_environment() -> dict[str, str]:
    """The environment of an installed dksm: bytecode compiled once and cached.

    A shell that sets PYTHONDONTWRITEBYTECODE would make every run compile every
    module from source, which is not what a user's ``dksm run`` costs."""
    import compileall

    import dksm

    compileall.compile_dir(os.path.dirname(dksm.__file__), quiet=1)
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _dksm_command() -> list[str]:
    """The installed ``dksm`` script beside this interpreter, as a user runs it."""
    script = os.path.join(os.path.dirname(sys.executable), "dksm")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "dksm"]


def _one_run(
    guest: str, mem_mib: int, dedup: str, env: dict[str, str], confined: bool = True
) -> tuple[float, float]:
    cmd = [*_dksm_command(), "run", "--kernel", guest, "--mem-mib", str(mem_mib),
           "--dedup", dedup, "--timeout", "30"]  # fmt: skip
    if not confined:
        cmd.append("--no-confine")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
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


def _result(
    guest: str, dedup: str, confined: bool, samples: list[tuple[float, float]]
) -> BootResult:
    return BootResult(
        guest=guest,
        runs=len(samples),
        dedup=dedup,
        first_byte_ms=tuple(s[0] for s in samples),
        exit_ms=tuple(s[1] for s in samples),
        confined=confined,
    )


def measure_boot(
    guest: str, runs: int, mem_mib: int = 16, dedup: str = "dksm", confined: bool = True
) -> BootResult:
    if runs < 1:
        raise BootBenchError(f"--runs must be at least 1, not {runs}")
    env = _installed_environment()
    _one_run(guest, mem_mib, dedup, env, confined)  # warm the page cache
    samples = [_one_run(guest, mem_mib, dedup, env, confined) for _ in range(runs)]
    return _result(guest, dedup, confined, samples)


@dataclass(frozen=True)
class ConfinementCost:
    confined: BootResult
    unconfined: BootResult

    def cost_ms(self) -> dict[str, float]:
        """Median confined minus median unconfined, to the first byte and to exit."""
        return {
            "first_byte": statistics.median(self.confined.first_byte_ms)
            - statistics.median(self.unconfined.first_byte_ms),
            "exit": statistics.median(self.confined.exit_ms)
            - statistics.median(self.unconfined.exit_ms),
        }

    def to_json(self) -> dict[str, object]:
        return {
            "confined": self.confined.to_json(),
            "unconfined": self.unconfined.to_json(),
            "cost_ms_median": self.cost_ms(),
        }

    def table(self) -> str:
        cost = self.cost_ms()
        return "\n".join(
            (
                self.unconfined.table(),
                self.confined.table(),
                f"confinement costs {cost['first_byte']:+.1f} ms to the first byte, "
                f"{cost['exit']:+.1f} ms to exit (medians)",
            )
        )


def compare_confinement(
    guest: str, runs: int, mem_mib: int = 16, dedup: str = "dksm"
) -> ConfinementCost:
    """``runs`` boots each confined and not, alternating."""
    if runs < 1:
        raise BootBenchError(f"--runs must be at least 1, not {runs}")
    env = _installed_environment()
    for confined in (True, False):
        _one_run(guest, mem_mib, dedup, env, confined)  # warm the page cache
    samples: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(runs):
        for confined in (True, False):
            samples[confined].append(_one_run(guest, mem_mib, dedup, env, confined))
    return ConfinementCost(
        _result(guest, dedup, True, samples[True]), _result(guest, dedup, False, samples[False])
    )
