"""The merge-overhead experiment of the DKSM thesis: what merging costs, dksm versus KSM.

P processes each hold N pages whose contents are identical across processes and
distinct within one, so that (P - 1) * N pages can be merged.  For each N:

``dksm``
    the workers fill their memory, wait at a barrier, then each merges its region
    into a fresh pool domain (:meth:`Lease.merge`, dksm's ``madvise``).  Cost: the
    workers' own CPU time (user + system, from ``time.process_time``) inside the
    merge call; elapsed: first start to last end.
``ksm``
    the workers fill their memory and advise it ``MADV_MERGEABLE``; then KSM is
    switched on with fast settings (``pages_to_scan`` 5000, ``sleep_millisecs`` 0).
    Cost: ksmd's CPU time until ``pages_sharing`` reaches the expected count;
    elapsed: switch-on to that moment.  KSM settings are restored afterwards.  Counts
    are taken relative to ``pages_sharing`` before the switch-on, but other mergeable
    memory on the host still costs ksmd time: measure on an otherwise quiet host.

Results go to ``merge-cost.csv`` and ``merge-cost.png`` in the output directory.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Final

from dksm.dedup import ksm
from dksm.dedup.pool import PagePool
from dksm.error import DksmError
from dksm.memory.host_mapping import (
    MADV_NOHUGEPAGE,
    PAGE_SIZE,
    advise,
    map_anonymous,
    unmap,
    view,
)

METHODS: Final = ("dksm", "ksm")
CSV_NAME: Final = "merge-cost.csv"
PLOT_NAME: Final = "merge-cost.png"
# KSM as fast as it goes, as in the thesis's comparison: it scans without pausing.
KSM_FAST: Final[dict[str, int | str]] = {
    "run": 1,
    "pages_to_scan": 5000,
    "sleep_millisecs": 0,
    "advisor_mode": "none",
}
_WORKER_TIMEOUT = 600.0
_FORK = multiprocessing.get_context("fork")  # workers need nothing re-imported


class MergeCostError(DksmError):
    """The merge-cost experiment cannot run as asked."""


@dataclass(frozen=True)
class MergeCostRow:
    """One method at one size."""

    method: str  # "dksm" or "ksm"
    processes: int
    pages: int  # per process
    pages_total: int  # processes * pages: what was offered for merging
    pages_merged: int  # pages found equal to a page kept elsewhere (dksm) / pages_sharing (ksm)
    pages_expected: int  # what full merging gives: (processes - 1) * pages, less for KSM chains
    converged: bool  # pages_merged reached pages_expected
    elapsed_s: float
    cpu_s: float  # dksm: workers' user + system time merging; ksm: ksmd's time
    cpu_us_per_page: float  # cpu_s per page offered
    cpu_us_per_merged_page: float  # cpu_s per page merged


def run_merge_cost(
    processes: int,
    pages: Sequence[int],
    out_dir: Path,
    *,
    methods: Sequence[str] = METHODS,
    pool_root: Path | None = None,
    ksm_timeout: float = 300.0,
    ksm_settings: dict[str, int | str] | None = None,
    on_row: Callable[[MergeCostRow], None] | None = None,
) -> list[MergeCostRow]:
    """Run the experiment for every N in ``pages``; write the CSV and plot; return rows.

    ``pool_root`` holds the temporary pool domains (default: a fresh directory under
    /dev/shm, removed afterwards).  ``on_row`` is called as each row is measured.
    """
    if processes < 1 or not pages or min(pages) < 1:
        raise MergeCostError("the experiment needs at least one process and one page")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise MergeCostError(f"unknown method {', '.join(unknown)}; choose from dksm, ksm")
    if "ksm" in methods and not (ksm.ksm_available() and ksm.ksm_controllable()):
        raise MergeCostError("measuring KSM needs a kernel with KSM and root")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[MergeCostRow] = []
    scratch = Path(tempfile.mkdtemp(prefix="dksm-merge-cost-", dir="/dev/shm"))
    try:
        for count in pages:
            for method in methods:
                if method == "dksm":
                    row = _measure_dksm(processes, count, pool_root or scratch)
                else:
                    row = _measure_ksm(processes, count, ksm_timeout, ksm_settings or KSM_FAST)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_csv(rows, out_dir / CSV_NAME)
    plot(rows, out_dir / PLOT_NAME)
    return rows


def _fill(address: int, count: int) -> None:
    """Page i holds i's bytes (and a marker), so pages differ within a process and
    match across processes."""
    region = view(address, count * PAGE_SIZE)
    for index in range(count):
        stamp = f"dksm merge-cost page {index:>12}\n".encode()
        region[index * PAGE_SIZE : (index + 1) * PAGE_SIZE] = stamp * (PAGE_SIZE // len(stamp)) + (
            b"\0" * (PAGE_SIZE % len(stamp))
        )


# -- dksm ------------------------------------------------------------------------------


def _dksm_worker(
    domain: str, root: Path, count: int, start: Barrier, done: Event, report: Connection
) -> None:
    length = count * PAGE_SIZE
    address = map_anonymous(length)
    _fill(address, count)
    with PagePool.open(domain, root) as pool, pool.lease() as lease:
        start.wait()
        began, cpu_before = time.monotonic(), time.process_time()
        result = lease.merge(address, length)
        cpu, ended = time.process_time() - cpu_before, time.monotonic()
        report.send((result.pages_merged, result.pages_new, cpu, began, ended))
        done.wait()  # keep the pages mapped until the parent has counted
        unmap(address, length)  # before the lease goes: its pages may be punched then


def _measure_dksm(processes: int, count: int, root: Path) -> MergeCostRow:
    domain = f"merge-cost-{os.getpid()}-{count}"
    start, done = _FORK.Barrier(processes), _FORK.Event()
    receive, send = _FORK.Pipe(duplex=False)
    workers = [
        _FORK.Process(target=_dksm_worker, args=(domain, root, count, start, done, send))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [_receive(receive, workers) for _ in workers]
        with PagePool.open(domain, root) as pool:
            stats = pool.stats()
    finally:
        done.set()
        _join(workers)
    with PagePool.open(domain, root) as pool:
        pool.purge()
    cpu = sum(report[2] for report in reports)
    merged = sum(report[0] for report in reports)
    elapsed = max(report[4] for report in reports) - min(report[3] for report in reports)
    expected = (processes - 1) * count
    if stats.hashtable_entries != count or stats.pages_merged != merged:
        raise MergeCostError(
            f"the pool holds {stats.hashtable_entries} pages (expected {count}) and counted "
            f"{stats.pages_merged} merged (workers saw {merged})"
        )
    return _row("dksm", processes, count, merged, expected, elapsed, cpu)


def _receive(
    receive: Connection, workers: Sequence[multiprocessing.process.BaseProcess]
) -> tuple[int, int, float, float, float]:
    deadline = time.monotonic() + _WORKER_TIMEOUT
    while not receive.poll(0.2):
        if any(worker.exitcode not in (None, 0) for worker in workers):
            raise MergeCostError("a merge-cost worker died; see its error above")
        if time.monotonic() > deadline:
            raise MergeCostError(f"merge-cost workers gave no result in {_WORKER_TIMEOUT:g} s")
    report: tuple[int, int, float, float, float] = receive.recv()
    return report


def _join(workers: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for worker in workers:
        worker.join(timeout=_WORKER_TIMEOUT)
        if worker.exitcode is None:
            worker.kill()
            worker.join()


# -- ksm -------------------------------------------------------------------------------


def _ksm_worker(count: int, ready: Barrier, done: Event) -> None:
    length = count * PAGE_SIZE
    address = map_anonymous(length)
    advise(address, length, MADV_NOHUGEPAGE)  # KSM merges small pages
    _fill(address, count)
    ksm.advise_mergeable(address, length)
    ready.wait()
    done.wait()


def _measure_ksm(
    processes: int, count: int, timeout: float, settings: dict[str, int | str]
) -> MergeCostRow:
    ready, done = _FORK.Barrier(processes + 1), _FORK.Event()
    workers = [
        _FORK.Process(target=_ksm_worker, args=(count, ready, done)) for _ in range(processes)
    ]
    with ksm.KsmSession() as session:
        for worker in workers:
            worker.start()
        try:
            ready.wait(timeout=_WORKER_TIMEOUT)
            max_sharing = int(session.saved.get("max_page_sharing", "256"))
            if "max_page_sharing" in settings:
                max_sharing = int(settings["max_page_sharing"])
            # Each KSM page serves at most max_page_sharing mappings.
            expected = count * (processes - math.ceil(processes / max_sharing))
            baseline = ksm.read_counters()["pages_sharing"]
            cpu_before = ksm.ksmd_runtime_seconds()
            session.apply(**settings)
            waited = ksm.wait_for_sharing(baseline + expected, timeout)
            cpu = ksm.ksmd_runtime_seconds() - cpu_before
            merged = ksm.read_counters()["pages_sharing"] - baseline
        finally:
            done.set()
            _join(workers)
    elapsed = timeout if waited is None else waited
    return _row("ksm", processes, count, merged, expected, elapsed, cpu)


def _row(
    method: str, processes: int, count: int, merged: int, expected: int, elapsed: float, cpu: float
) -> MergeCostRow:
    total = processes * count
    return MergeCostRow(
        method=method,
        processes=processes,
        pages=count,
        pages_total=total,
        pages_merged=merged,
        pages_expected=expected,
        converged=merged >= expected,
        elapsed_s=elapsed,
        cpu_s=cpu,
        cpu_us_per_page=cpu / total * 1e6,
        cpu_us_per_merged_page=cpu / merged * 1e6 if merged else math.nan,
    )


# -- output ----------------------------------------------------------------------------


def write_csv(rows: Sequence[MergeCostRow], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[field.name for field in fields(MergeCostRow)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def plot(rows: Sequence[MergeCostRow], path: Path) -> None:
    """Elapsed time and CPU per page against N, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (elapsed_axes, cpu_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        chosen = sorted((row for row in rows if row.method == method), key=lambda row: row.pages)
        if not chosen:
            continue
        sizes = [row.pages for row in chosen]
        elapsed_axes.plot(sizes, [row.elapsed_s for row in chosen], marker="o", label=method)
        cpu_axes.plot(sizes, [row.cpu_us_per_page for row in chosen], marker="o", label=method)
    processes = rows[0].processes if rows else 0
    elapsed_axes.set(
        xlabel="pages per process",
        ylabel="elapsed (s)",
        title=f"Time to merge, {processes} processes",
    )
    cpu_axes.set(
        xlabel="pages per process", ylabel="CPU per page offered (µs)", title="CPU cost of merging"
    )
    for axes in (elapsed_axes, cpu_axes):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
