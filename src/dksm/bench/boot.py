"""Boot latency: from starting a ``dksm run`` process to the guest's first serial
byte, and to the process's exit.

Each run is a fresh interpreter, as a user's ``dksm run`` is, so interpreter
start-up and imports count: they are part of what a microVM costs to start.

Variants (the same guest with different ``dksm run`` flags: with and without the
TSC-frequency CPUID leaf, confined or with ``--no-confine``) are measured
interleaved, one run of each in turn, so that the machine's drift over the
measurement falls on all of them alike; :func:`median_differences` says what each
variant costs against the first.

One run after another leaves the page pool empty between boots (a VM's pages and
its image's manifest live as long as its lease), so every boot is a first load.
With ``keep_image_leased`` each variant is also measured as a *known image*: this
process loads the image once under a lease of its own, as a VM of it would, and
holds it while those runs start, so their loads find the image's manifest and take
its pages in one step.  Each round runs the first loads, then takes the lease and
runs the known-image loads, then releases it (outside the timed runs).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dksm.error import DksmError

if TYPE_CHECKING:
    from dksm.dedup.pool import PagePool


class BootBenchError(DksmError):
    """A benchmark run did not boot as expected."""


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, extremes and spread of some timings."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


@dataclass(frozen=True)
class BootResult:
    guest: str
    runs: int
    dedup: str
    first_byte_ms: tuple[float, ...]
    exit_ms: tuple[float, ...]
    variant: str = "default"
    flags: tuple[str, ...] = ()  # the variant's extra ``dksm run`` flags

    def to_json(self) -> dict[str, object]:
        first = summary(self.first_byte_ms)
        done = summary(self.exit_ms)
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
            s = summary(values)
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


def _bare_interpreter_run(env: dict[str, str]) -> float:
    """Milliseconds from starting this interpreter with nothing to do to its exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - start) * 1000


@dataclass(frozen=True)
class BootMeasurement:
    """Every variant's boots and the bare interpreter's starts, from the same rounds."""

    results: list[BootResult]
    interpreter_ms: tuple[float, ...]
    # With the image kept leased: pages the known-image runs referenced through the
    # image's manifest (the pool's counter), per run; None without.
    manifest_pages_per_known_run: float | None = None


FIRST_LOAD = "first load"
KNOWN_IMAGE = "known image"


@contextmanager
def image_leased(guest: str, mem_mib: int) -> Iterator[PagePool]:
    """Hold ``guest``'s read-only pages in the default pool under a lease of this
    process, loaded as a VM of ``mem_mib`` MiB loads them; yields the open pool.
    The memory is unmapped before the lease is released (the pool's rule)."""
    from dksm.arch.layout import MIB
    from dksm.dedup.pool import PagePool
    from dksm.guests import resolve_image_path
    from dksm.loader.elf import load_elf
    from dksm.memory.guest_memory import GuestMemory

    image = load_elf(resolve_image_path(guest), mem_mib * MIB)
    with PagePool.open() as pool, pool.lease() as lease:
        memory = GuestMemory(mem_mib * MIB)
        try:
            memory.load_image(image, lease)
            yield pool
        finally:
            memory.close()


def measure_boot(
    guest: str,
    runs: int,
    mem_mib: int = 16,
    dedup: str = "dksm",
    flags: Sequence[str] = (),
    variants: Mapping[str, Sequence[str]] | None = None,
    keep_image_leased: bool = False,
) -> BootMeasurement:
    """Boot ``guest`` ``runs`` times per variant (name -> extra flags), interleaved
    with as many bare interpreter starts; ``flags`` go to every run (boot arguments,
    initrd).  With ``keep_image_leased``, every variant twice: as a first load and
    as a known image (see the module's docstring)."""
    if runs < 1:
        raise BootBenchError(f"--runs must be at least 1, not {runs}")
    if keep_image_leased and dedup not in ("dksm", "dksm+ksm"):
        raise BootBenchError(
            f"--keep-image-leased holds the image in the page pool: it needs --dedup dksm"
            f" or dksm+ksm, not {dedup}"
        )
    chosen = dict(variants) if variants else {"default": ()}
    env = _installed_environment()
    _bare_interpreter_run(env)  # warm the page cache
    for extra in chosen.values():
        _one_run(guest, mem_mib, dedup, env, [*flags, *extra])
    first = {_named(name, FIRST_LOAD, keep_image_leased): extra for name, extra in chosen.items()}
    known = {_named(name, KNOWN_IMAGE, True): extra for name, extra in chosen.items()}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in first}
    if keep_image_leased:
        samples.update({name: [] for name in known})
    bare: list[float] = []
    manifest_pages = 0
    for _ in range(runs):
        bare.append(_bare_interpreter_run(env))
        for name, extra in first.items():
            samples[name].append(_one_run(guest, mem_mib, dedup, env, [*flags, *extra]))
        if keep_image_leased:
            with image_leased(guest, mem_mib) as pool:
                before = pool.stats().manifest_pages
                for name, extra in known.items():
                    samples[name].append(_one_run(guest, mem_mib, dedup, env, [*flags, *extra]))
                manifest_pages += pool.stats().manifest_pages - before
    every = {**first, **known} if keep_image_leased else first
    results = [
        BootResult(
            guest=guest,
            runs=runs,
            dedup=dedup,
            first_byte_ms=tuple(s[0] for s in samples[name]),
            exit_ms=tuple(s[1] for s in samples[name]),
            variant=name,
            flags=tuple(every[name]),
        )
        for name in every
    ]
    per_known_run = manifest_pages / (runs * len(known)) if keep_image_leased else None
    return BootMeasurement(results, tuple(bare), per_known_run)


def _named(variant: str, load: str, tell: bool) -> str:
    """A variant's name, with the kind of load when the bench compares both."""
    if not tell:
        return variant
    return load if variant == "default" else f"{variant}, {load}"


def interpreter_ratios(measurement: BootMeasurement) -> dict[str, float]:
    """Each variant's median time to the first byte over the bare interpreter's
    median start, both from the same rounds (issue goal: at most 2.5)."""
    bare = statistics.median(measurement.interpreter_ms)
    return {r.variant: statistics.median(r.first_byte_ms) / bare for r in measurement.results}


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
