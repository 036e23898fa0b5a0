"""``dksm analyze`` without KVM: page classes by the loader's rule, content-addressed
sharing and the fleet model on images built byte by byte, shifted runs found and
explained, the shipped guests, and the command line (JSON, plot, bad input)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from dksm.analyze.analysis import analyze_images
from dksm.analyze.pages import PageClass, read_image
from dksm.analyze.predict import predict_fleet
from dksm.analyze.sharing import PageStatus
from dksm.guests import guest_path

from conftest import dksm
from elf_builder import PF_R, PF_W, PF_X, Seg, make_elf

PAGE = 4096
MIB = 1 << 20


def _bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _write(tmp_path: Path, name: str, segments: list[Seg]) -> Path:
    path = tmp_path / f"{name}.elf"
    path.write_bytes(make_elf(segments))
    return path


def test_page_classes_follow_the_loaders_rule(tmp_path: Path) -> None:
    image = _write(
        tmp_path,
        "classes",
        [
            # read-only, starting and ending inside pages: partial, shareable, partial
            Seg(0x100800, _bytes(1, 0x2000), flags=PF_R | PF_X),
            # writable with a zero-filled tail: writable, writable, zero-fill x2
            Seg(0x200000, _bytes(2, 0x1800), memsz=0x4000, flags=PF_R | PF_W),
            # read-only whole pages, then zero fill: shareable x3, zero-fill x2
            Seg(0x300000, _bytes(3, 0x3000), memsz=0x5000, flags=PF_R),
        ],
    )
    img = read_image(image, 16 * MIB)
    classes = {page.addr: page.cls for page in img.pages}
    s, p, w, z = PageClass.SHAREABLE, PageClass.PARTIAL, PageClass.WRITABLE, PageClass.ZERO_FILL
    assert classes == {
        0x100000: p,
        0x101000: s,
        0x102000: p,
        0x200000: w,
        0x201000: w,
        0x202000: z,
        0x203000: z,
        0x300000: s,
        0x301000: s,
        0x302000: s,
        0x303000: z,
        0x304000: z,
    }
    by_addr = {page.addr: page for page in img.pages}
    # A page's content is what loading puts there: file bytes in place, zeros around.
    assert by_addr[0x100000].content == bytes(0x800) + _bytes(1, 0x2000)[:0x800]
    assert by_addr[0x201000].content == _bytes(2, 0x1800)[0x1000:] + bytes(0x800)
    assert by_addr[0x303000].content is None
    assert "no function or object symbols" in img.notes[0]

    fleet = predict_fleet([img], [3])
    assert fleet.hashtable_entries == 4
    assert fleet.none_pages == 3 * 8  # every loaded page, per instance
    assert fleet.dksm_pages == 4 + 3 * 4  # the pool once, partial and writable per instance
    assert fleet.ksm_pages == 8  # every distinct loaded page once


def test_identical_content_at_other_addresses_is_one_pool_page(tmp_path: Path) -> None:
    """The pool is content-addressed: a page repeated inside an image, or held by two
    images at different addresses, is stored once."""
    a_pages = [_bytes(10, PAGE), _bytes(11, PAGE), _bytes(10, PAGE)]  # page 0 == page 2
    b_pages = [_bytes(12, PAGE), _bytes(11, PAGE)]  # shares page 1 with a, elsewhere
    a = _write(tmp_path, "a", [Seg(0x100000, b"".join(a_pages), flags=PF_R | PF_X)])
    b = _write(tmp_path, "b", [Seg(0x400000, b"".join(b_pages), flags=PF_R | PF_X)])
    analysis = analyze_images([a, b], [2, 1], 16 * MIB)
    assert analysis.matrix.shared == ((2, 1), (1, 2))
    assert analysis.matrix.same_address == ((3, 0), (0, 2))
    assert analysis.matrix.distinct_shareable == 3
    assert analysis.fleet.hashtable_entries == 3
    assert analysis.fleet.none_pages == 2 * 3 + 1 * 2
    assert analysis.fleet.dksm_pages == 3
    status_a = [r.status for r in analysis.pages[0]]
    assert status_a == [PageStatus.OWN, PageStatus.SHARED, PageStatus.OWN]


def test_shifted_library_is_found_and_its_pages_counted(tmp_path: Path) -> None:
    """The same 5-page "library" after app code of different sizes: no page is
    identical, and the analysis says why (one shift) and what aligning would give,
    despite "relocated" 4-byte differences every 500 bytes."""
    library = bytearray(_bytes(20, 5 * PAGE))
    other = bytearray(library)
    for offset in range(100, len(other), 500):
        other[offset : offset + 4] = _bytes(offset, 4)
    a = _write(tmp_path, "a", [Seg(0x100000, _bytes(21, 0x100) + bytes(library))])
    b = _write(tmp_path, "b", [Seg(0x100000, _bytes(22, 0x40) + bytes(other))])
    analysis = analyze_images([a, b], [1], 16 * MIB)
    assert analysis.matrix.shared[0][1] == 0
    (pair,) = analysis.shifts
    assert pair.pages_if_aligned == 4  # whole pages of a inside the library
    region = pair.listed_regions()[0]
    assert region.delta == 0x40 - 0x100
    assert region.delta_mod_page == (0x40 - 0x100) % PAGE
    assert region.a_addr == 0x100100
    assert region.length == 5 * PAGE
    assert region.runs == len(range(100, len(other), 500)) + 1
    statuses = {r.addr: r.status for r in analysis.pages[0]}
    assert [statuses[0x100000 + k * PAGE] for k in range(1, 5)] == [PageStatus.SHIFTED] * 4


def test_shipped_guests_share_their_library_and_little_else() -> None:
    names = ["hello", "idle", "cowprobe"]
    analysis = analyze_images([guest_path(n) for n in names], [2, 2, 1], 128 * MIB)
    # guests/README.md: 95 library text pages and 25 library rodata pages are
    # identical across apps (the 2 data pages are writable, never shared).
    for i in range(3):
        for j in range(3):
            if i != j:
                assert analysis.matrix.shared[i][j] == 120
    assert all(p.pages_if_aligned == 0 for p in analysis.shifts)
    for k, img in enumerate(analysis.images):
        assert img.symbols, "the shipped images carry their symbol tables"
        rows = analysis.pages[k]
        assert sum(r.status is PageStatus.SHARED for r in rows) == 120
        assert sum(r.status is PageStatus.WRITABLE for r in rows) == 2
        text = [r for r in rows if ".text" in r.sections]
        assert any("app_main" in dict(r.symbols) for r in text)


def _analyze_json(*args: str) -> dict[str, Any]:
    result = dksm("analyze", *args, "--json")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_json_has_pages_matrix_shifts_and_fleet() -> None:
    doc = _analyze_json("hello", "idle", "cowprobe", "--instances", "2,2,1")
    assert doc["page_size"] == PAGE
    labels = [img["label"] for img in doc["images"]]
    assert labels == ["hello", "idle", "cowprobe"] == doc["sharing"]["labels"]
    matrix = doc["sharing"]["matrix"]
    for i, img in enumerate(doc["images"]):
        assert matrix[i][i] == img["pages"]["distinct_shareable"]
        assert all(matrix[i][j] == matrix[j][i] for j in range(3))
        assert len(img["page_list"]) == img["pages"]["loaded"]
        page = img["page_list"][0]
        assert set(page) >= {"addr", "class", "status", "sections", "symbols", "common_bytes"}
        assert sum(img["status"].values()) == img["pages"]["loaded"]
        assert {s["name"] for s in img["sections"]} == {".text", ".rodata", ".data"}
    assert len(doc["shifted"]) == 3  # one entry per pair
    assert set(doc["shifted"][0]) >= {"a", "b", "runs", "pages_if_aligned", "regions"}
    fleet = doc["fleet"]
    assert fleet["instances"] == {"hello": 2, "idle": 2, "cowprobe": 1}
    assert fleet["hashtable_entries"] == doc["sharing"]["distinct_shareable_pages"]
    loaded = [img["pages"]["loaded"] for img in doc["images"]]
    assert fleet["pages"]["none"] == 2 * loaded[0] + 2 * loaded[1] + loaded[2]
    assert fleet["pages"]["dksm"] == fleet["hashtable_entries"] + fleet["dksm_private_pages"]
    assert fleet["pages"]["ksm"] <= fleet["pages"]["dksm"] < fleet["pages"]["none"]
    assert fleet["bytes"]["dksm"] == fleet["pages"]["dksm"] * PAGE


def test_table_output_names_every_part() -> None:
    result = dksm("analyze", "hello", "idle")
    assert result.returncode == 0, result.stderr
    for needle in (
        "Pages of each image",
        "Identical read-only pages per pair",
        "Loaded pages by section and status",
        "Predicted guest-image memory",
        "hashtable_entries",
    ):
        assert needle in result.stdout


def test_plot_is_a_png(tmp_path: Path) -> None:
    out = tmp_path / "matrix.png"
    result = dksm("analyze", "hello", "idle", "compute", "--plot", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


def _one_line_error(result: Any) -> str:
    stderr: str = result.stderr
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dksm: error: ")
    return lines[0]


BAD_IMAGES = {
    "not_elf": (b"#!/bin/sh\necho hi\n" * 10, "not an ELF file"),
    "truncated": (make_elf([Seg(0x100000, b"\xf4" * 64)])[:0x1010], "truncated"),
    "truncated_header": (make_elf([Seg(0x100000, b"\xf4" * 64)])[:40], "truncated ELF header"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_gives_the_same_one_line_error_as_run(case: str, tmp_path: Path) -> None:
    data, needle = BAD_IMAGES[case]
    path = tmp_path / f"{case}.elf"
    path.write_bytes(data)
    line = _one_line_error(dksm("analyze", "hello", str(path)))
    assert needle in line
    assert line == _one_line_error(dksm("run", "--kernel", str(path)))


def test_missing_image_and_bad_counts_are_one_line_errors(tmp_path: Path) -> None:
    assert "cannot read kernel image" in _one_line_error(dksm("analyze", str(tmp_path / "no")))
    assert "2 instance counts given for 3 images" in _one_line_error(
        dksm("analyze", "hello", "idle", "compute", "--instances", "1,2")
    )
    assert "comma-separated whole numbers" in _one_line_error(
        dksm("analyze", "hello", "--instances", "two")
    )
    assert "cannot write the plot" in _one_line_error(
        dksm("analyze", "hello", "--plot", str(tmp_path / "no" / "such" / "dir.png"))
    )
