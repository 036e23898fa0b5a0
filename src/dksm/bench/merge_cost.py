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

The thesis's own shape (:func:`run_thesis_sweep`, ``dksm bench merge-cost --thesis``)
measures something else: the wall time of a whole program in which P forked processes
each write one word per page into N fresh pages (the page's index: distinct within a
process, equal across processes), advise them, unmap them and exit, timed from the
first fork to the last child reaped, for N = 100 ... 10,000 in steps of 100.  Under
DKSM the advice merges synchronously; under KSM (at the host's untouched scan
settings, only switched on) it just registers the region, and the processes are gone
long before ksmd gets to them, so KSM's time is that of a program that merged
nothing.  ``none`` (no advice at all) is the program's own cost.  Beside each wall
time: what merging cost in CPU per page (dksm: the workers' CPU inside the merge;
KSM: ksmd's CPU while the program ran) and how many pages were merged by its end.
Results go to ``merge-cost-thesis.csv`` and ``merge-cost-thesis.png``.

Why one module over 500 lines: its two experiments (CPU per merged page, and the
thesis's program) run the same forked workers, page filling and hand-over of results
(``_fill``, ``_receive``, ``_join``); split, that protocol would live in two places.
"""

from __future__ import annotations

import contextlib
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


# -- the thesis's program shape ---------------------------------------------------------

THESIS_METHODS: Final = ("none", "ksm", "dksm")
THESIS_CSV_NAME: Final = "merge-cost-thesis.csv"
THESIS_PLOT_NAME: Final = "merge-cost-thesis.png"
THESIS_PAGES: Final = tuple(range(100, 10_001, 100))  # the thesis's sweep


@dataclass(frozen=True)
class ThesisRow:
    """One run of the thesis-shaped program."""

    method: str  # "none" (no advice), "ksm" (MADV_MERGEABLE) or "dksm" (Lease.merge)
    processes: int
    pages: int  # per process
    wall_s: float  # first fork to last child reaped: the thesis's `time` of the program
    pages_merged: int  # by the time the program ended (KSM: pages_sharing gained)
    merge_cpu_s: float  # dksm: workers' CPU inside merge; ksm: ksmd's CPU meanwhile
    cpu_us_per_page: float  # merge_cpu_s per page offered


def run_thesis_sweep(
    processes: int,
    pages: Sequence[int],
    out_dir: Path,
    *,
    methods: Sequence[str] = THESIS_METHODS,
    pool_root: Path | None = None,
    on_row: Callable[[ThesisRow], None] | None = None,
) -> tuple[list[ThesisRow], dict[str, str]]:
    """The thesis-shaped program for every N in ``pages`` and every method; writes
    the CSV and plot; returns the rows and the KSM settings it ran under."""
    if processes < 1 or not pages or min(pages) < 1:
        raise MergeCostError("the experiment needs at least one process and one page")
    unknown = sorted(set(methods) - set(THESIS_METHODS))
    if unknown:
        raise MergeCostError(f"unknown method {', '.join(unknown)}; choose from none, ksm, dksm")
    if "ksm" in methods and not (ksm.ksm_available() and ksm.ksm_controllable()):
        raise MergeCostError("measuring KSM needs a kernel with KSM and root")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[ThesisRow] = []
    scratch = Path(tempfile.mkdtemp(prefix="dksm-merge-cost-", dir="/dev/shm"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, True)
        session = stack.enter_context(ksm.KsmSession()) if "ksm" in methods else None
        untouched = ksm.read_settings() if ksm.ksm_available() else {}
        for count in pages:
            for method in methods:
                if session is not None:  # only ksm runs with ksmd on, as the thesis did
                    session.apply(run=ksm.RUN_MERGE if method == "ksm" else ksm.RUN_STOP)
                row = _thesis_program(method, processes, count, pool_root or scratch)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    used: dict[str, str] = {
        k: untouched[k] for k in ("pages_to_scan", "sleep_millisecs") if k in untouched
    }
    write_csv(rows, out_dir / THESIS_CSV_NAME)
    plot_thesis(rows, out_dir / THESIS_PLOT_NAME, used)
    return rows, used


def _thesis_worker(method: str, domain: str, root: Path, count: int, report: Connection) -> None:
    length = count * PAGE_SIZE
    address = map_anonymous(length)
    advise(address, length, MADV_NOHUGEPAGE)  # the thesis ran with huge pages off
    region = view(address, length)
    for index in range(count):  # one word per page: its index
        region[index * PAGE_SIZE : index * PAGE_SIZE + 8] = index.to_bytes(8, "little")
    region.release()
    merged, cpu_before = 0, time.process_time()
    if method == "ksm":
        ksm.advise_mergeable(address, length)
    elif method == "dksm":
        with PagePool.open(domain, root) as pool, pool.lease() as lease:
            merged = lease.merge(address, length).pages_merged
            cpu = time.process_time() - cpu_before
            unmap(address, length)  # before the lease goes
            report.send((merged, cpu))
            return
    cpu = time.process_time() - cpu_before
    unmap(address, length)
    report.send((merged, cpu))


def _thesis_program(method: str, processes: int, count: int, root: Path) -> ThesisRow:
    domain = f"merge-cost-thesis-{os.getpid()}-{count}"
    receive, send = _FORK.Pipe(duplex=False)
    workers = [
        _FORK.Process(target=_thesis_worker, args=(method, domain, root, count, send))
        for _ in range(processes)
    ]
    sharing_before = ksm.read_counters().get("pages_sharing", 0) if ksm.ksm_available() else 0
    ksmd_before = ksm.ksmd_runtime_seconds() if method == "ksm" else 0.0
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        reports = [_receive_pair(receive, workers) for _ in workers]
    finally:
        _join(workers)
    wall = time.monotonic() - started
    if method == "ksm":
        merged = ksm.read_counters()["pages_sharing"] - sharing_before
        cpu = ksm.ksmd_runtime_seconds() - ksmd_before
    else:
        merged = sum(report[0] for report in reports)
        cpu = sum(report[1] for report in reports) if method == "dksm" else 0.0
    if method == "dksm":
        with PagePool.open(domain, root) as pool:
            left = pool.stats()
            pool.purge()
        # Fewer than (P - 1) * N pages merge when a process exits before the next one
        # advises: its pages leave the pool with it (the thesis's kernel, too, only
        # merged with pages still mapped).  None may stay behind.
        if left.leases or left.hashtable_entries or left.pages_merged != merged:
            raise MergeCostError(
                f"the pool kept {left.hashtable_entries} pages and counted "
                f"{left.pages_merged} merged (workers saw {merged})"
            )
    return ThesisRow(
        method=method,
        processes=processes,
        pages=count,
        wall_s=wall,
        pages_merged=max(0, merged),
        merge_cpu_s=cpu,
        cpu_us_per_page=cpu / (processes * count) * 1e6,
    )


def _receive_pair(
    receive: Connection, workers: Sequence[multiprocessing.process.BaseProcess]
) -> tuple[int, float]:
    deadline = time.monotonic() + _WORKER_TIMEOUT
    while not receive.poll(0.05):
        if any(worker.exitcode not in (None, 0) for worker in workers):
            raise MergeCostError("a merge-cost worker died; see its error above")
        if time.monotonic() > deadline:
            raise MergeCostError(f"merge-cost workers gave no result in {_WORKER_TIMEOUT:g} s")
    report: tuple[int, float] = receive.recv()
    return report


def plot_thesis(rows: Sequence[ThesisRow], path: Path, ksm_settings: dict[str, str]) -> None:
    """The thesis's figure (wall time of the program against N) beside CPU per page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (wall_axes, cpu_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"none": ("#4d4d4d", "-"), "ksm": ("#d95f02", "--"), "dksm": ("#1b9e77", "-")}
    for method in THESIS_METHODS:
        chosen = sorted((r for r in rows if r.method == method), key=lambda r: r.pages)
        if not chosen:
            continue
        color, style = styles[method]
        sizes = [r.pages for r in chosen]
        label = {"none": "no advice (the program alone)", "ksm": "KSM", "dksm": "dksm"}[method]
        wall_axes.plot(sizes, [r.wall_s for r in chosen], style, color=color, label=label)
        if method != "none":
            cpu_axes.plot(
                sizes, [r.cpu_us_per_page for r in chosen], style, color=color, label=label
            )
    processes = rows[0].processes if rows else 0
    scan = (
        f"{ksm_settings['pages_to_scan']} pages / {ksm_settings['sleep_millisecs']} ms"
        if ksm_settings
        else "n/a"
    )
    wall_axes.set(
        xlabel="pages per process (N)",
        ylabel="wall time of the whole program (s)",
        title=f"{processes} processes advise N pages each (KSM at {scan})",
    )
    cpu_axes.set(
        xlabel="pages per process (N)",
        ylabel="merging CPU per page offered (µs)",
        title="dksm: workers' CPU in merge; KSM: ksmd's CPU meanwhile",
    )
    for axes in (wall_axes, cpu_axes):
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        axes.title.set_fontsize(9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- output ----------------------------------------------------------------------------


def write_csv(rows: Sequence[MergeCostRow] | Sequence[ThesisRow], path: Path) -> None:
    kind = type(rows[0]) if rows else MergeCostRow
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[field.name for field in fields(kind)])
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
