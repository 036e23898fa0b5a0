"""Aligned versus naive builds of the guest kit: the naive layout shares far fewer
pages, ``dksm analyze`` explains why (the library shifted by a non-page amount), and
real fleets of both agree with the prediction.  The naive images are built with the
system toolchain into a temporary directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dksm.analyze.analysis import analyze_images
from dksm.analyze.sharing import PageStatus
from dksm.bench.layouts import build_naive_images, run_layouts
from dksm.guests import guest_path

from conftest import requires_kvm, requires_root

APPS = ("hello", "idle", "cowprobe")
PAGE = 4096
MIB = 1 << 20
# guests/README.md: 95 library text pages + 25 library rodata pages, identical
# across apps in the aligned layout.
LIBRARY_READONLY_PAGES = 120


@pytest.fixture(scope="module")
def naive(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    missing = [tool for tool in ("gcc", "ld", "objdump") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the naive guest images needs {', '.join(missing)}")
    return build_naive_images(tmp_path_factory.mktemp("naive-build"), APPS)


def test_naive_layout_shares_fewer_pages_and_shifted_runs_explain_it(naive: list[Path]) -> None:
    aligned = [guest_path(app) for app in APPS]
    analysis = analyze_images(aligned + naive, [1], 128 * MIB)
    n = len(APPS)
    shared = analysis.matrix.shared
    for i in range(n):
        for j in range(n):
            if i != j:
                assert shared[i][j] >= LIBRARY_READONLY_PAGES  # aligned: the library
                assert shared[n + i][n + j] <= 10  # naive: a few stray pages
    for pair in analysis.shifts:
        if pair.a_index < n or pair.b_index < n:
            continue  # aligned-aligned or aligned-naive
        # The library is found in both naive images, shifted by a non-page amount,
        # and aligning it would share nearly all of its pages.
        assert pair.pages_if_aligned >= 0.85 * LIBRARY_READONLY_PAGES, pair
        biggest = pair.listed_regions()[0]
        assert biggest.delta_mod_page != 0
        assert biggest.length >= 90 * PAGE  # the library text, at least
    for k in range(n, 2 * n):
        rows = analysis.pages[k]
        shifted = sum(r.status is PageStatus.SHIFTED for r in rows)
        assert shifted >= 0.85 * LIBRARY_READONLY_PAGES, (analysis.images[k].label, shifted)


@requires_kvm
@requires_root
def test_naive_fleet_needs_more_pool_pages_as_predicted(naive: list[Path]) -> None:
    aligned = [guest_path(app) for app in APPS[:2]]
    rows = run_layouts(aligned, naive[:2], instances=2)
    by_layout = {r.layout: r for r in rows}
    for row in rows:
        assert row.vms == 4
        assert row.hashtable_entries == row.predicted_hashtable_entries
        assert row.image_bytes == row.predicted_image_bytes + row.cow_pages * PAGE
    a, b = by_layout["aligned"], by_layout["naive"]
    # Two apps: the aligned pool holds the library once, the naive one twice.
    assert b.hashtable_entries >= 2 * a.hashtable_entries - 10
    assert b.image_bytes > a.image_bytes + LIBRARY_READONLY_PAGES * PAGE * 3 // 4
