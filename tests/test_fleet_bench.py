"""The fleet experiment on a small real fleet, in every mode, against real KSM:
what must hold, and KSM's host-wide settings put back afterwards, also when the
run is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dksm.bench.fleet import FleetBenchConfig, KsmKnobs, run_fleet_bench
from dksm.bench.fleet_report import write_outputs
from dksm.dedup import ksm
from dksm.fleet.instance import DedupMode

from conftest import requires_kvm, requires_root

pytestmark = [
    requires_kvm,
    requires_root,
    pytest.mark.skipif(not ksm.ksm_available(), reason="needs a kernel with KSM"),
]
PAGE = 4096
# What the pool itself costs besides the pages it shares: its LMDB index on tmpfs
# and the supervisor's open handle.  Measured here at about 0.4 MiB.
POOL_OVERHEAD_ALLOWANCE = 1 << 20


def test_small_fleet_in_every_mode(tmp_path: Path) -> None:
    before = ksm.read_settings()
    cfg = FleetBenchConfig(
        images=["idle"],
        instances=4,
        modes=[DedupMode.NONE, DedupMode.KSM, DedupMode.DKSM, DedupMode.DKSM_KSM],
        duration=20.0,
        knobs=KsmKnobs(pages_to_scan=5000, sleep_millisecs=10),
        out_dir=tmp_path,
        settle_seconds=2.0,
    )
    runs, host = run_fleet_bench(cfg, show_progress=False)
    results = {r.mode: r for r in runs}
    summary = write_outputs(cfg, runs, host)
    assert ksm.read_settings() == before

    none, ksm_run, dksm, both = (results[m] for m in ("none", "ksm", "dksm", "dksm+ksm"))
    assert all(r.instances == 4 and r.failed_vms == 0 for r in results.values())
    # dksm: merged at boot, by at least the read-only pages it shared
    assert dksm.pool_pages_saved == 3 * dksm.pool_hashtable_entries
    shared_bytes = dksm.pool_pages_saved * PAGE
    assert none.memory_at_boot - dksm.memory_at_boot >= shared_bytes - POOL_OVERHEAD_ALLOWANCE
    assert dksm.converge_seconds <= 1.0
    # KSM: sharing shows in pages_sharing, and memory falls below the unshared fleet's
    # (with these fast settings it may fall before the first sample is taken)
    assert ksm_run.samples[-1].pages_sharing > 0
    assert ksm_run.final_memory < none.final_memory - shared_bytes // 2
    assert both.memory_at_boot < none.memory_at_boot
    # outputs
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert set(doc["modes"]) == {"none", "ksm", "dksm", "dksm+ksm"}
    for mode in doc["modes"].values():
        assert {
            "memory_at_boot_bytes",
            "final_memory_bytes",
            "converge_seconds",
            "dedup_cpu_seconds",
            "instances",
        } <= set(mode)
    assert summary == doc
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for mode in ("none", "ksm", "dksm", "dksm-ksm"):
        assert (tmp_path / f"memory-{mode}.csv").read_text().startswith("t,memory_bytes")


def test_interrupted_run_restores_ksm_and_stops_the_fleet(tmp_path: Path) -> None:
    before = ksm.read_settings()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dksm",
            "bench",
            "fleet",
            "--image",
            "idle",
            "--instances",
            "2",
            "--modes",
            "ksm",
            "--duration",
            "60",
            "--ksm-pages-to-scan",
            "3000",
            "--ksm-sleep-ms",
            "50",
            "--out",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while ksm.read_settings().get("pages_to_scan") != "3000":  # the run has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert ksm.read_settings() == before
    assert not ksm.state_file_path().exists()
    fleets = Path(os.environ["DKSM_RUN_DIR"])
    for state in fleets.glob("*/fleet.json"):
        doc = json.loads(state.read_text())
        for member in doc["members"]:
            assert not Path(f"/proc/{member['pid']}").exists(), err


def test_next_dksm_command_repairs_ksm_after_a_kill_9(tmp_path: Path) -> None:
    before = ksm.read_settings()
    env = {**os.environ, "DKSM_KSM_STATE": str(tmp_path / "ksm-settings.json")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dksm", "bench", "fleet", "--image", "idle", "--instances", "1",
         "--modes", "ksm", "--duration", "60", "--ksm-pages-to-scan", "2999",
         "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    fleets = Path(os.environ["DKSM_RUN_DIR"])
    known = set(fleets.glob("*"))

    def running() -> bool:  # KSM switched on, and the run's fleet up (its processes
        # would otherwise repair KSM themselves as they start)
        new = [d / "fleet.json" for d in set(fleets.glob("*")) - known]
        booted = any(f.exists() and json.loads(f.read_text()).get("booted") for f in new)
        return booted and ksm.read_settings().get("pages_to_scan") == "2999"

    try:
        deadline = time.monotonic() + 30
        while not running():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()  # no chance to restore anything
        proc.wait()
    try:
        assert ksm.read_settings()["pages_to_scan"] == "2999"  # left behind by the dead run
        assert (tmp_path / "ksm-settings.json").exists()
        repaired = subprocess.run(
            [sys.executable, "-m", "dksm", "guests", "list"],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert repaired.returncode == 0
        assert "restored KSM settings" in repaired.stderr
        assert ksm.read_settings() == before
    finally:  # the dead run's fleet outlives it; stop it as a user would
        for directory in set(fleets.glob("*")) - known:
            subprocess.run([sys.executable, "-m", "dksm", "fleet", "down", directory.name],
                           capture_output=True, check=False, env=env)  # fmt: skip
