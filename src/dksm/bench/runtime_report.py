"""The run-time experiment's outputs: its JSON document, figures and table.

:mod:`dksm.bench.runtime` measures; this module turns its rows into
``runtime.json`` (each row's medians and spread, and how much slower than the same
placement without deduplication), the bar figures (``runtime.png``, and
``runtime-perf.png`` where hardware counters were read) and the terminal table.
matplotlib and rich are imported only when a figure or table is made.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from dksm.bench import perf_counters
from dksm.bench.fleet import HostRecord
from dksm.bench.fleet_report import MODE_STYLE
from dksm.bench.runtime import (
    JSON_NAME,
    KSM_OFF,
    PERF_PLOT_NAME,
    PLOT_NAME,
    RuntimeConfig,
    RuntimeRow,
    quartiles,
)
from dksm.fleet.instance import DedupMode


def to_json(
    cfg: RuntimeConfig,
    rows: Sequence[RuntimeRow],
    host: HostRecord,
    probe: perf_counters.PerfProbe,
) -> dict[str, object]:
    label, measured = cfg.measured()
    baseline = {
        r.placement: statistics.median(s.run_time_s for s in r.samples)
        for r in rows
        if r.mode == DedupMode.NONE.value
    }
    docs = []
    for row in rows:
        doc = row.to_json()
        base = baseline.get(row.placement)
        # How much slower than the same placement without any deduplication.
        median = statistics.median(s.run_time_s for s in row.samples)
        doc["run_time_vs_none"] = round(median / base, 4) if base else None
        docs.append(doc)
    return {
        "image": label,
        "kernel": measured.kernel_path,
        "boot_args": measured.boot_args,
        "runs": cfg.runs,
        "background": {
            "images": cfg.background_fleet().labels if cfg.background_instances else [],
            "instances_per_image": cfg.background_instances,
            "touch_kib": cfg.background_touch_kib,
            "vms_per_process": cfg.vms_per_worker,
        },
        "cpus": {"background_and_ksmd": cfg.cpus[0], "measured_apart": cfg.cpus[1]},
        "ksm_settings": {s: cfg.describe_setting(s) for s in (*cfg.ksm_settings, KSM_OFF)},
        "ksm_scope": cfg.ksm_scope.value,
        "confined": cfg.confine,
        "mem_mib": cfg.mem_mib,
        "hardware_counters": {
            "available": probe.available,
            "events": list(probe.events),
            "reason": probe.reason,
        },
        **host.to_json(),
        "rows": docs,
    }


def write_outputs(
    cfg: RuntimeConfig,
    rows: Sequence[RuntimeRow],
    host: HostRecord,
    probe: perf_counters.PerfProbe,
) -> dict[str, object]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    doc = to_json(cfg, rows, host, probe)
    (cfg.out_dir / JSON_NAME).write_text(json.dumps(doc, indent=2))
    plot(doc, cfg.out_dir / PLOT_NAME)
    if probe.available:
        plot(doc, cfg.out_dir / PERF_PLOT_NAME, perf_events=probe.events)
    return doc


def _bar_label(row: Mapping[str, object]) -> str:
    setting = str(row["ksm_setting"])
    return str(row["mode"]) if setting == KSM_OFF else f"{row['mode']}\n(KSM {setting})"


def plot(doc: Mapping[str, object], path: Path, perf_events: Sequence[str] = ()) -> None:
    """Bars per placement, one per mode and KSM setting, with median and standard
    deviation: the thesis's figure shape (bars per app and mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, object]] = doc["rows"]  # type: ignore[assignment]
    placements = list(dict.fromkeys(str(r["placement"]) for r in rows))
    bars = list(dict.fromkeys(_bar_label(r) for r in rows))
    panels: list[tuple[str, str]] = (
        [(f"perf:{event}", f"{event} (median)") for event in perf_events]
        if perf_events
        else [
            ("run_time_s", "guest run time (s)"),
            ("ksmd_cpu_s", "ksmd CPU during the run (s)"),
            ("cpu_s", "VMM CPU time, user + system (s)"),
            ("waiting_s", "VMM off its CPU: elapsed - CPU (s)"),
            ("minor_faults", "VMM minor page faults"),
            ("involuntary_switches", "VMM involuntary context switches"),
        ]
    )
    columns = 3 if len(panels) > 4 else 2
    lines = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 3.6 * lines), squeeze=False)
    width = 0.8 / max(1, len(bars))
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for b, bar in enumerate(bars):
            heights, below, above, xs = [], [], [], []
            for p, placement in enumerate(placements):
                match = [r for r in rows if r["placement"] == placement and _bar_label(r) == bar]
                if not match:
                    continue
                row = match[0]
                if key.startswith("perf:"):
                    value = row["perf_median"].get(key[5:])  # type: ignore[attr-defined]
                    heights.append(float(value or 0))
                    below.append(0.0)
                    above.append(0.0)
                else:
                    # Whiskers: the middle half of the runs, from the samples themselves.
                    values = [float(s[key]) for s in row["samples"]]  # type: ignore[attr-defined]
                    median = statistics.median(values)
                    first, third = quartiles(values)
                    heights.append(median)
                    below.append(median - first)
                    above.append(third - median)
                xs.append(p - 0.4 + width * (b + 0.5))
            mode = bar.split("\n")[0]
            color = MODE_STYLE.get(mode, ("black", "", "", 0.0))[0]
            ax.bar(
                xs, heights, width, yerr=[below, above], capsize=2, color=color,
                hatch="//" if "aggressive" in bar else None, edgecolor="white",
                label=bar.replace("\n", " "),
            )  # fmt: skip
        ax.set_xticks(range(len(placements)), placements)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(bars)), fontsize=8)
    background = doc["background"]
    fig.suptitle(
        f"{doc['image']}: {doc['runs']} runs per bar (median; whiskers: the middle half), "
        f"background {background['instances_per_image']} x "  # type: ignore[index]
        f"{', '.join(background['images']) or 'none'}",  # type: ignore[index]
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(doc: Mapping[str, object]) -> object:
    from rich.table import Table

    t = Table(title=f"run time of {doc['image']} ({doc['runs']} runs per row, medians)")
    for col in (
        "placement",
        "mode",
        "KSM",
        "run time (s)",
        "± stdev",
        "vs none",
        "ksmd CPU (s)",
        "minor faults",
        "major",
        "ctx switches",
        "user (s)",
        "sys (s)",
        "off CPU (s)",
        "host load",
    ):
        t.add_column(col, justify="right")
    for r in doc["rows"]:  # type: ignore[attr-defined]
        ratio = r["run_time_vs_none"]
        t.add_row(
            r["placement"],
            r["mode"],
            r["ksm_setting"],
            f"{r['run_time_s_median']:.3f}",
            f"{r['run_time_s_stdev']:.3f}",
            "" if ratio is None else f"{ratio:.3f}",
            f"{r['ksmd_cpu_s_median']:.3f}",
            f"{r['minor_faults_median']:.0f}",
            f"{r['major_faults_median']:.0f}",
            f"{r['context_switches_median']:.0f}",
            f"{r['user_s_median']:.3f}",
            f"{r['system_s_median']:.3f}",
            f"{r['waiting_s_median']:.3f}",
            f"{r['load_average_1m']:.1f}",
        )
    return t
