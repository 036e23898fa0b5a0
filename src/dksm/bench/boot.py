"""Boot latency: from starting a ``dksm run`` process to the guest's first serial
byte, and to the process's exit.

Each run is a fresh interpreter, as a user's ``dksm run`` is, so interpreter
start-up and imports count: they are part of what a microVM costs to start.

Variants (the same guest with different ``dksm run`` flags: with and without the
TSC-frequency CPUID leaf, confined or with ``--no-confine``) are measured
interleaved, one run of each in turn, so that the machine's drift over the
measurement falls on all of them alike; :func:`median_differences` says what each
variant costs against the first.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
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
    variant: str = "default"
    flags: tuple[str, ...] = ()  # the variant's extra ``dksm run`` flags

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
            "variant": self.variant,
            "flags": list(self.flags),
            "runs": self.runs,
            "dedup": self.dedup,
            "first_byte_ms_median": first["median"],
            "exit_ms_median": done["median"],
            "first_byte_ms": first,
            "exit_ms": done,
        }

    def table(self) -> str:
        variant = "" if self.variant == "default" else f", {self.variant}"
        rows = [
            f"boot of '{self.guest}' (dedup {self.dedup}{variant}), {self.runs} runs (ms)",
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
    guest: str, mem_mib: int, dedup: str, env: dict[str, str], flags: Sequence[str]
) -> tuple[float, float]:
    cmd = [*_dksm_command(), "run", "--kernel", guest, "--mem-mib", str(mem_mib),
           "--dedup", dedup, "--timeout", "30", *flags]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
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


def measure_boot(
    guest: str,
    runs: int,
    mem_mib: int = 16,
    dedup: str = "dksm",
    flags: Sequence[str] = (),
    variants: Mapping[str, Sequence[str]] | None = None,
) -> list[BootResult]:
    """Boot ``guest`` ``runs`` times per variant (name -> extra flags), interleaved;
    ``flags`` go to every run (boot arguments, initrd)."""
    if runs < 1:
        raise BootBenchError(f"--runs must be at least 1, not {runs}")
    chosen = dict(variants) if variants else {"default": ()}
    env = _installed_environment()
    for extra in chosen.values():
        _one_run(guest, mem_mib, dedup, env, [*flags, *extra])  # warm the page cache
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
    for _ in range(runs):
        for name, extra in chosen.items():
            samples[name].append(_one_run(guest, mem_mib, dedup, env, [*flags, *extra]))
    return [
        BootResult(
            guest=guest,
            runs=runs,
            dedup=dedup,
            first_byte_ms=tuple(s[0] for s in samples[name]),
            exit_ms=tuple(s[1] for s in samples[name]),
            variant=name,
            flags=tuple(chosen[name]),
        )
        for name in chosen
    ]


def median_differences(results: Sequence[BootResult]) -> dict[str, dict[str, float]]:
    """Each variant's median minus the first variant's, to the first byte and to exit
    (``"B - A"`` for variants A, B)."""
    if len(results) < 2:
        return {}
    base = results[0]
    return {
        f"{r.variant} - {base.variant}": {
            "first_byte": statistics.median(r.first_byte_ms)
            - statistics.median(base.first_byte_ms),
            "exit": statistics.median(r.exit_ms) - statistics.median(base.exit_ms),
        }
        for r in results[1:]
    }
