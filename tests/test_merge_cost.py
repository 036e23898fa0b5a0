"""The merge-cost experiment at toy sizes: it runs, counts right and writes its files."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dksm.bench.merge_cost import CSV_NAME, PLOT_NAME, MergeCostError, run_merge_cost
from dksm.dedup.ksm import ksm_available, ksm_controllable

HAVE_KSM = ksm_available() and ksm_controllable()


def test_dksm_merge_cost_rows_count_every_merged_page(tmp_path: Path) -> None:
    rows = run_merge_cost(3, [4, 16], tmp_path, methods=["dksm"])
    assert [(row.method, row.pages) for row in rows] == [("dksm", 4), ("dksm", 16)]
    for row in rows:
        assert row.pages_total == 3 * row.pages
        assert row.pages_merged == row.pages_expected == 2 * row.pages
        assert row.converged
        assert row.cpu_s > 0 and row.elapsed_s > 0
    with (tmp_path / CSV_NAME).open() as written:
        table = list(csv.DictReader(written))
    assert [(line["method"], int(line["pages"]), int(line["pages_merged"])) for line in table] == [
        ("dksm", 4, 8),
        ("dksm", 16, 32),
    ]
    assert (tmp_path / PLOT_NAME).read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(not HAVE_KSM, reason="needs a kernel with KSM and root")
def test_ksm_merge_cost_waits_for_ksm_to_merge_everything(tmp_path: Path) -> None:
    rows = run_merge_cost(2, [32], tmp_path, methods=["dksm", "ksm"], ksm_timeout=60)
    by_method = {row.method: row for row in rows}
    assert by_method.keys() == {"dksm", "ksm"}
    ksm_row = by_method["ksm"]
    assert ksm_row.pages_expected == 32
    assert ksm_row.converged and ksm_row.pages_merged >= 32
    assert ksm_row.cpu_s >= 0
    with (tmp_path / CSV_NAME).open() as written:
        assert [line["method"] for line in csv.DictReader(written)] == ["dksm", "ksm"]


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MergeCostError, match="at least one"):
        run_merge_cost(0, [4], tmp_path)
    with pytest.raises(MergeCostError, match="unknown method"):
        run_merge_cost(2, [4], tmp_path, methods=["bogus"])
