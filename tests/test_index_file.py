"""The LMDB data-file check before mapping: a healthy file whose last page lies
beyond its end (pages allocated and freed within one transaction are never written)
is accepted; a file cut below a tree's root is refused as truncated."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import lmdb

from dksm.dedup.index_file import data_file_problem

LAST_PAGE_AT = 136
TXN_ID_AT = 144
ROOTS_AT = (40 + 40, 88 + 40)  # free-page tree's and main tree's root page


def _data_file(directory: Path) -> Path:
    with lmdb.open(str(directory), map_size=1 << 24, sync=False) as env:
        for start in range(0, 3000, 500):
            with env.begin(write=True) as txn:
                for key in range(start, start + 500):
                    txn.put(b"key %06d" % key, b"v" * 300)
    return directory / "data.mdb"


def _problem(path: Path) -> str | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_file_problem(fd)
    finally:
        os.close(fd)


def _newer_meta(path: Path) -> int:
    """Offset of the meta page LMDB reads through (the higher transaction id)."""
    data = path.read_bytes()
    return max((0, 4096), key=lambda at: struct.unpack_from("=Q", data, at + TXN_ID_AT)[0])


def test_a_last_page_beyond_the_end_of_a_healthy_file_is_accepted(tmp_path: Path) -> None:
    path = _data_file(tmp_path)
    assert _problem(path) is None
    meta = _newer_meta(path)
    pages = path.stat().st_size // 4096
    with open(path, "r+b") as f:  # as a commit that freed its last pages leaves it
        f.seek(meta + LAST_PAGE_AT)
        f.write(struct.pack("=Q", pages + 5))
    assert _problem(path) is None


def test_a_file_cut_below_a_tree_root_is_truncated(tmp_path: Path) -> None:
    path = _data_file(tmp_path)
    data = path.read_bytes()
    meta = _newer_meta(path)
    roots = [struct.unpack_from("=Q", data, meta + at)[0] for at in ROOTS_AT]
    highest = max(root for root in roots if root != 2**64 - 1)
    assert highest >= 2  # beyond the two meta pages
    os.truncate(path, highest * 4096)
    problem = _problem(path)
    assert problem is not None and "was truncated" in problem
