"""The fleet experiment's outputs: per-mode CSV files of memory over time,
``summary.json``, the memory-over-time figure and the terminal table.

:mod:`dksm.bench.fleet` runs the fleets and samples them; this module writes what
it found.  ``MODE_STYLE`` is how every figure of the benchmarks draws each dedup
mode.  matplotlib and rich are imported only when a figure or table is made.
"""

from __future__ import annotations

import csv
import json
import textwrap
from dataclasses import asdict
from pathlib import Path

from dksm.bench.fleet import MIB, FleetBenchConfig, HostRecord, ModeResult, Sample


def write_outputs(
    cfg: FleetBenchConfig, results: list[ModeResult], host: HostRecord | None = None
) -> dict[str, object]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for result in results:
        with open(
            cfg.out_dir / f"memory-{result.mode.replace('+', '-')}.csv", "w", newline=""
        ) as f:
            writer = csv.DictWriter(f, fieldnames=list(Sample.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(asdict(s) for s in result.samples)
    summary: dict[str, object] = {
        "images": cfg.labels,
        "instances_per_image": cfg.instances,
        "mem_mib": cfg.mem_mib,
        "ksm": cfg.knobs.describe(),
        "ksm_scope": cfg.ksm_scope.value,
        "touch_kib": cfg.touch_kib,
        "vms_per_process": cfg.vms_per_worker,
        "time_origin": "first VM started" if cfg.from_launch else "every VM booted",
        **(host or HostRecord.now()).to_json(),
        "modes": {r.mode: r.summary() for r in results},
    }
    (cfg.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(results, cfg, cfg.out_dir / "memory.png")
    return summary


# How each mode is drawn: colour, line style, marker, width.  Distinct in every
# channel, so overlapping curves (dksm under dksm+ksm, none under ksm at first) and
# grey-scale prints still tell them apart; wider lines are drawn first, beneath.
MODE_STYLE: dict[str, tuple[str, str, str, float]] = {
    "none": ("#4d4d4d", "-", "s", 3.2),
    "ksm": ("#d95f02", "--", "o", 2.0),
    "dksm": ("#1b9e77", "-", "D", 4.0),
    "dksm+ksm": ("#7570b3", "-.", "^", 1.6),
}


def plot(results: list[ModeResult], cfg: FleetBenchConfig, path: Path) -> None:
    """Memory over time, every mode on one time axis.

    A mode whose sampling stopped early (memory had settled) is extended to the
    longest mode's end at its final value, drawn dotted and marked where its
    measurements end, so it neither stops short nor hides under another curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.8), dpi=110)
    end = max((r.samples[-1].t for r in results if r.samples), default=0.0)
    ordered = sorted(results, key=lambda r: -MODE_STYLE.get(r.mode, ("", "", "", 1.0))[3])
    for r in ordered:
        if not r.samples:
            continue
        color, style, marker, width = MODE_STYLE.get(r.mode, ("black", "-", "x", 1.5))
        times = [s.t for s in r.samples]
        mib = [s.memory_bytes / MIB for s in r.samples]
        label = r.mode
        last = times[-1]
        if last < end - cfg.interval:  # it stopped early (memory had settled)
            label += f" (measured to {last:.0f} s, then held)"
            ax.plot([last, end], [mib[-1], mib[-1]], color=color, linestyle=":", linewidth=width)
            ax.plot([last], [mib[-1]], color=color, marker="|", markersize=14, mew=2)
        ax.plot(
            times, mib, label=label, color=color, linestyle=style, linewidth=width,
            marker=marker, markevery=max(1, len(times) // 12), markersize=5,
        )  # fmt: skip
    labels = cfg.labels
    total = len(labels) * cfg.instances
    touched = f", {cfg.touch_kib // 1024} MiB touched each" if cfg.touch_kib else ""
    per_process = f", {cfg.vms_per_worker} VM(s) per process"
    title = (
        f"{total} microVMs ({', '.join(labels)}{touched}{per_process}), KSM {cfg.knobs.describe()}"
    )
    ax.set_title(textwrap.fill(title, 100), fontsize=9)
    ax.set_xlabel(
        "seconds since the first VM started" if cfg.from_launch else "seconds since every VM booted"
    )
    ax.set_ylabel("MiB: Pss_Anon summed over the fleet's\nprocesses + the page pool on tmpfs")
    ax.set_xlim(left=0, right=max(end, 1.0))
    peak = max((s.memory_bytes for r in results for s in r.samples), default=MIB) / MIB
    ax.set_ylim(bottom=0, top=peak * 1.08)  # room above the highest curve, not on the frame
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: list[ModeResult]) -> object:
    from rich.table import Table

    t = Table(title="fleet memory by dedup mode")
    for col in (
        "mode",
        "VMs",
        "at boot (MiB)",
        "final (MiB)",
        "converged after (s)",
        "dedup CPU (s)",
    ):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(
            r.mode,
            str(r.instances),
            f"{r.memory_at_boot / MIB:.1f}",
            f"{r.final_memory / MIB:.1f}",
            f"{r.converge_seconds:.1f}",
            f"{r.dedup_cpu_seconds:.3f}",
        )
    return t
