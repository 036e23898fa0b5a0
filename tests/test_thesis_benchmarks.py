"""The thesis's experiments in short configurations, for real: a few VMs, a few
seconds each, real KSM, real /dev/kvm.  Each writes its documented JSON with sane
values, and every host-wide setting it changed (KSM's, transparent huge pages,
ksmd's CPUs) is back afterwards, also when it is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dksm.bench import perf_counters
from dksm.bench.duplicates import DuplicatesConfig, run_duplicates
from dksm.bench.duplicates import write_outputs as write_duplicates
from dksm.bench.fleet import FleetBenchConfig, KsmKnobs, run_fleet_bench
from dksm.bench.fleet_report import write_outputs
from dksm.bench.merge_cost import THESIS_CSV_NAME, THESIS_PLOT_NAME, run_thesis_sweep
from dksm.bench.runtime import RuntimeConfig, run_runtime_bench
from dksm.bench.runtime_report import write_outputs as write_runtime
from dksm.dedup import huge_pages, ksm
from dksm.fleet.instance import DedupMode

from conftest import dksm, requires_kvm, requires_root

pytestmark = [
    requires_kvm,
    requires_root,
    pytest.mark.skipif(not ksm.ksm_available(), reason="needs a kernel with KSM"),
]
PNG = b"\x89PNG\r\n\x1a\n"
MIB = 1 << 20


def host_settings() -> tuple[dict[str, str], str, set[int]]:
    pid = ksm.ksmd_pid()
    assert pid is not None
    return ksm.read_settings(), huge_pages.read_thp_enabled(), os.sched_getaffinity(pid)


@pytest.fixture
def host_unchanged() -> Iterator[tuple[dict[str, str], str, set[int]]]:
    before = host_settings()
    yield before
    assert host_settings() == before
    assert not ksm.state_file_path().exists()


def test_runtime_rows_measure_each_run_of_the_vmm(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    cfg = RuntimeConfig(
        image="compute",
        rounds=3,
        runs=2,
        passes=2,  # each row twice, a run each time
        modes=[DedupMode.NONE, DedupMode.DKSM_KSM],
        placements=["same-core", "alone"],
        ksm_settings=["aggressive"],
        background=["idle"],
        background_instances=2,
        background_touch_kib=1024,
        cpus=(0, 1) if len(os.sched_getaffinity(0)) > 1 else (0, 0),
        settle=0.2,
        thp="never",
        timeout=60,
        out_dir=tmp_path,
    )
    rows, host, probe = run_runtime_bench(cfg)
    returned = write_runtime(cfg, rows, host, probe)
    doc: Any = json.loads((tmp_path / "runtime.json").read_text())
    assert doc == returned
    assert (tmp_path / "runtime.png").read_bytes()[:8] == PNG
    assert (doc["thp_enabled"], doc["thp_enabled_found"]) == ("never", host_unchanged[1])
    assert doc["confined"] is True  # every VMM as dksm run and fleet up leave it
    assert doc["hardware_counters"]["available"] == bool(doc["hardware_counters"]["events"])
    if not probe.available:
        assert "not" in probe.reason  # says plainly why there are none
    by_key = {(r["mode"], r["placement"], r["ksm_setting"]): r for r in doc["rows"]}
    assert set(by_key) == {
        ("none", "same-core", "off"),
        ("dksm+ksm", "same-core", "aggressive"),
        ("none", "alone", "off"),
        ("dksm+ksm", "alone", "aggressive"),
    }
    for (mode, placement, _), row in by_key.items():
        assert row["runs"] == 2 and len(row["samples"]) == 2
        assert row["background_vms"] == (0 if placement == "alone" else 2)
        for sample in row["samples"]:
            # the guest's time is inside the process's, and costs CPU: emulated guest
            # code is system time of the VMM
            assert 0 < sample["run_time_s"] < sample["elapsed_s"]
            assert sample["system_s"] > 0 and sample["user_s"] > 0
            assert sample["minor_faults"] > 100
            assert sample["context_switches"] > 0
            assert sample["ksmd_cpu_s"] >= 0
            off_cpu = sample["elapsed_s"] - sample["user_s"] - sample["system_s"]
            assert sample["waiting_s"] == pytest.approx(max(0.0, off_cpu))
        assert row["run_time_s_min"] <= row["run_time_s_median"] <= row["run_time_s_max"]
        assert row["run_time_s_stdev"] >= 0
        if mode == "none":
            assert row["ksmd_cpu_s_max"] < 0.01  # ksmd is stopped
            assert row["run_time_vs_none"] == 1.0


def test_runtime_command_prints_its_json_and_refuses_bad_input(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    done = dksm(
        "bench", "runtime", "--rounds", "2", "--runs", "1", "--modes", "ksm",
        "--placements", "alone", "--ksm-settings", "default", "--cpus", "0,0",
        "--settle", "0", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    (row,) = doc["rows"]
    assert (row["mode"], row["placement"], row["ksm_setting"], row["runs"]) == (
        "ksm", "alone", "default", 1,
    )  # fmt: skip
    assert row["run_time_s_median"] > 0 and row["run_time_s_stdev"] == 0
    assert doc["ksm_settings"]["default"] == "100 pages / 20 ms"
    for args, message in (
        (["--placements", "upside-down"], "unknown placement 'upside-down'"),
        (["--cpus", "0"], "--cpus names two CPUs"),
        (["--runs", "0"], "--runs must be at least 1"),
        (["--ksm-aggressive", "fast"], "--ksm-aggressive is PAGES/MS"),
        (["--cpus", "0,4096"], "not available to this process"),
    ):
        bad = dksm("bench", "runtime", "--out", str(tmp_path), *args)
        assert bad.returncode == 1, bad.stderr
        assert message in bad.stderr and "Traceback" not in bad.stderr


def test_interrupted_runtime_restores_ksm_huge_pages_and_ksmd(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dksm", "bench", "runtime", "--rounds", "2000", "--runs", "5",
         "--modes", "ksm", "--placements", "same-core", "--ksm-settings", "aggressive",
         "--ksm-aggressive", "777/10", "--background", "idle", "--background-instances", "1",
         "--thp", "never", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while ksm.read_settings().get("pages_to_scan") != "777":  # the row has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    assert huge_pages.read_thp_enabled() == "never"
    deadline = time.monotonic() + 30
    while not (children := _children(proc.pid)):  # the fleet, then a measured run
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # into the measured runs
    children |= _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    for state in Path(os.environ["DKSM_RUN_DIR"]).glob("*/fleet.json"):
        for member in json.loads(state.read_text())["members"]:
            assert not Path(f"/proc/{member['pid']}").exists(), err
    deadline = time.monotonic() + 5  # the dead are reaped by init, not at once
    while [pid for pid in children if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, (children, err)
        time.sleep(0.05)


def _children(parent: int) -> set[int]:
    """Processes whose parent is ``parent`` (its measured runs, its fleet's supervisor)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == parent:
            found.add(int(stat.parent.name))
    return found


def test_duplicates_grow_step_by_step(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    cfg = DuplicatesConfig(
        images=["idle", "hello"],
        steps=2,
        modes=[DedupMode.NONE, DedupMode.DKSM],
        settle_seconds=0.5,
        interval=0.25,
        step_timeout=10,
        out_dir=tmp_path,
    )
    results, host = run_duplicates(cfg)
    returned = write_duplicates(cfg, results, host)
    doc: Any = json.loads((tmp_path / "duplicates.json").read_text())
    assert doc == returned
    assert (tmp_path / "duplicates.png").read_bytes()[:8] == PNG
    steps = doc["steps"]
    assert [s["instances_per_image"] for s in steps] == [1, 2]
    for mode in ("none", "dksm"):
        first, second = (s["modes"][mode] for s in steps)
        # one more VM of each image: more memory, though not much more than twice
        assert 2 * MIB < first < second < 3 * first
    saved = [d["pool_pages_saved"] for d in doc["detail"]["dksm"]]
    assert 0 < saved[0] < saved[1]  # the second instance of each image shares its pages
    assert all(d["settled"] for d in doc["detail"]["none"])


def test_duplicates_and_thesis_merge_cost_commands_print_their_json(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    done = dksm(
        "bench", "duplicates", "--image", "idle", "--steps", "1", "--modes", "none,ksm",
        "--settle", "0.5", "--ksm-pages-to-scan", "2000", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    (step,) = doc["steps"]
    assert step["instances_per_image"] == 1 and set(step["modes"]) == {"none", "ksm"}
    assert all(memory > MIB for memory in step["modes"].values())
    assert doc["vms_per_process"] == 1 and doc["images"] == ["idle"]
    done = dksm(
        "bench", "merge-cost", "--thesis", "--processes", "2", "--pages", "8:24:16",
        "--out", str(tmp_path), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    assert [(r["method"], r["pages"]) for r in rows] == [
        (method, pages) for pages in (8, 24) for method in ("none", "ksm", "dksm")
    ]
    bad = dksm("bench", "merge-cost", "--thesis", "--pages", "50:10:5", "--out", str(tmp_path))
    assert bad.returncode == 1 and "ends before it starts" in bad.stderr


def test_fleet_from_launch_samples_every_mode_from_the_first_vm(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    cfg = FleetBenchConfig(
        images=["idle"],
        instances=3,
        modes=[DedupMode.DKSM, DedupMode.KSM],
        duration=2.5,
        interval=0.25,
        knobs=KsmKnobs(pages_to_scan=2000, sleep_millisecs=10),
        vms_per_worker=1,
        from_launch=True,
        thp="never",
        out_dir=tmp_path,
    )
    results, host = run_fleet_bench(cfg, show_progress=False)
    summary = write_outputs(cfg, results, host)
    assert (summary["thp_enabled"], summary["time_origin"]) == ("never", "first VM started")
    assert summary["vms_per_process"] == 1
    for result in results:
        times = [s.t for s in result.samples]
        assert times == sorted(times) and times[0] >= 0
        assert times[0] <= result.booted_t  # boot itself is on the curve
        assert cfg.duration - 1.0 < times[-1] < cfg.duration + 1.0  # the whole duration
        assert result.samples[-1].processes == 3 + 1  # a process per VM, and the supervisor
        assert result.failed_vms == 0
    assert (tmp_path / "memory.png").read_bytes()[:8] == PNG


def test_interrupted_fleet_from_launch_stops_the_booting_fleet(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    fleets = Path(os.environ["DKSM_RUN_DIR"])
    known = set(fleets.glob("*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dksm", "bench", "fleet", "--image", "idle", "--instances", "4",
         "--vms-per-process", "1", "--from-launch", "--duration", "60", "--modes", "dksm",
         "--thp", "never", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not [d for d in set(fleets.glob("*")) - known if (d / "fleet.json").exists()]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    assert huge_pages.read_thp_enabled() == "never"
    proc.send_signal(signal.SIGINT)  # while the fleet boots, or just after
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    for directory in set(fleets.glob("*")) - known:
        state = json.loads((directory / "fleet.json").read_text())
        assert not Path(f"/proc/{state['supervisor_pid']}").exists()
        for member in state["members"]:
            assert not Path(f"/proc/{member['pid']}").exists(), err
    # ... and its pool domain is gone with it
    assert not (Path(os.environ["DKSM_POOL_ROOT"]) / f"bench-dksm-{proc.pid}").exists()


def test_thesis_shaped_merge_cost_times_the_whole_program(
    tmp_path: Path, host_unchanged: tuple[dict[str, str], str, set[int]]
) -> None:
    rows, scan = run_thesis_sweep(3, [4, 64], tmp_path)
    assert [(r.method, r.pages) for r in rows] == [
        (method, pages) for pages in (4, 64) for method in ("none", "ksm", "dksm")
    ]
    assert scan["pages_to_scan"] == host_unchanged[0]["pages_to_scan"]  # untouched
    for row in rows:
        assert row.processes == 3 and row.wall_s > 0
        if row.method == "dksm":
            # merged synchronously, with the copies of processes still alive (at most
            # every copy but one; the run checked that the pool ended empty)
            assert 0 <= row.pages_merged <= 2 * row.pages and row.merge_cpu_s > 0
        else:
            assert row.merge_cpu_s < 0.05  # none: no work; KSM: ksmd had no time
    assert (tmp_path / THESIS_CSV_NAME).read_text().startswith("method,processes,pages,wall_s")
    assert (tmp_path / THESIS_PLOT_NAME).read_bytes()[:8] == PNG


def test_perf_reads_what_it_counts() -> None:
    if perf_counters.probe(["page-faults"]).events != ("page-faults",):
        pytest.skip("perf is not installed")
    hardware = perf_counters.probe()
    assert hardware.available or "hardware" in hardware.reason
    software = perf_counters.probe(["page-faults", "context-switches"])
    assert software.events == ("page-faults", "context-switches")
    out = Path(os.environ["DKSM_RUN_DIR"]) / "perf.csv"
    argv = perf_counters.command([sys.executable, "-c", "pass"], software.events, out)
    subprocess.run(argv, check=True, capture_output=True)
    counts = perf_counters.read(out)
    assert counts["page-faults"] is not None and counts["page-faults"] > 100
