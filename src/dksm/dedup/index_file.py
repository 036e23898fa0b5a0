"""What an LMDB data file must look like before LMDB is allowed to map it.

LMDB maps its data file whole and believes the two meta pages at its start: they
give the page size, the last page in use and the root page of each tree.  A file
shorter than the pages they describe (truncated by a full tmpfs, a bad copy or a
user) makes LMDB read beyond the end of the file, which the kernel answers with
SIGBUS: the process dies, and with it every command that opens the pool.  A file
that is not LMDB's at all is read as garbage.  So the pool reads the meta pages
itself, through the descriptor it checked (:mod:`dksm.dedup.trust`), and refuses the
file unless both are meta pages of LMDB's data format and the root page of each tree
of the newer one (the one LMDB reads through) lies inside the file.

The meta's "last page in use" may lie beyond the end of a healthy file: pages a
transaction allocated at the end and freed again before committing ("loose" pages)
go to the free list unwritten, and the file grows over them only when a later
transaction reuses them.  Under many concurrent writers that state is common (seen
with 64 processes merging into one pool), so it is not taken for truncation.

Deeper damage (a garbled tree page between valid metas) is LMDB's to detect; it
reports it as an error (``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``), which the index
turns into one line.  Only the pool's owner can write these files at all.

Layout (LMDB 0.9 on a 64-bit host, host byte order).  A meta page is page 0 or 1;
page 1 starts one page size after page 0:

====== ===== ==========================================================
offset bytes field
====== ===== ==========================================================
0      8     page number
10     2     page flags (``P_META`` = 0x08)
16     4     magic, 0xBEEFC0DE
20     4     data format version, 1
40     4     page size (kept in the free-page tree's record, first field)
40     48    free-page tree record; main tree record follows at 88
+40    8     a tree record's root page (all ones: empty tree)
136    8     last page in use
144    8     transaction id
====== ===== ==========================================================
"""

from __future__ import annotations

import os
import struct
import time

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Final

META_MAGIC: Final = 0xBEEFC0DE
DATA_VERSION: Final = 1
P_META: Final = 0x08
NO_PAGE: Final = 0xFFFF_FFFF_FFFF_FFFF
MIN_PAGE_SIZE: Final = 512
MAX_PAGE_SIZE: Final = 0x10000

_PAGE_FLAGS = struct.Struct("=10xH")
_META_HEAD = struct.Struct("=16xII")
_TREE_RECORD_OFFSETS = (40, 88)  # free-page tree, main tree
_TREE_PAGE_SIZE = struct.Struct("=I")  # first field of the free-page tree's record
_TREE_ROOT = struct.Struct("=Q")  # at +40 in a tree record
_TREE_ROOT_AT = 40
_LAST_PAGE = struct.Struct("=Q")
_LAST_PAGE_AT = 136
_TXN_ID = struct.Struct("=Q")
_TXN_ID_AT = 144
_META_SIZE = 152
_CONFIRMATIONS = 2
_CONFIRMATION_PAUSE = 0.01  # seconds: far longer than one commit's meta write


def data_file_problem(fd: int) -> str | None:
    """What is wrong with the LMDB data file open as ``fd``, or None if LMDB may map
    it.  An empty file is fine: LMDB writes a new environment into it.

    Other processes may be committing to the file meanwhile: a commit writes its pages
    (growing the file) before the meta page naming them, so the metas are read before
    the size; and a meta page read while it is rewritten may be torn, so a problem
    is confirmed by looking again before it is reported.
    """
    problem = _problem(fd)
    for _ in range(_CONFIRMATIONS):
        if problem is None:
            return None
        time.sleep(_CONFIRMATION_PAUSE)
        problem = _problem(fd)
    return problem


def _problem(fd: int) -> str | None:
    if os.fstat(fd).st_size == 0:
        return None
    first = os.pread(fd, _META_SIZE, 0)
    problem = _meta_problem(first, 0)
    if problem is not None:
        return problem
    (page_size,) = _TREE_PAGE_SIZE.unpack_from(first, _TREE_RECORD_OFFSETS[0])
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        return f"its meta page gives a page size of {page_size} bytes, which LMDB never uses"
    second = os.pread(fd, _META_SIZE, page_size)
    problem = _meta_problem(second, 1)
    if problem is not None:
        return problem
    # LMDB reads through the newer meta page (the older one is being rewritten).
    number, meta = max(
        enumerate((first, second)), key=lambda m: _TXN_ID.unpack_from(m[1], _TXN_ID_AT)
    )
    size = os.fstat(fd).st_size
    if size < 2 * page_size:
        return f"it is {size} bytes, shorter than LMDB's two meta pages of {page_size} bytes"
    pages_held = size // page_size
    (last,) = _LAST_PAGE.unpack_from(meta, _LAST_PAGE_AT)
    # The file may end before the last page the meta page counts: pages a commit
    # allocated and freed again ("loose" pages) are counted but never written, so a
    # large commit can leave the file a few pages short.  A tree root beyond the
    # file's end, though, is a page LMDB would read and find missing.
    for record in _TREE_RECORD_OFFSETS:
        (root,) = _TREE_ROOT.unpack_from(meta, record + _TREE_ROOT_AT)
        if root == NO_PAGE:
            continue
        if root > last:
            return f"its meta page {number} names a root page {root} beyond its last page"
        if root >= pages_held:
            return (
                f"it holds {pages_held} pages of {page_size} bytes, but its meta page "
                f"{number} has a tree rooted at page {root}: it was truncated"
            )
    return None


def _meta_problem(meta: bytes, number: int) -> str | None:
    if len(meta) < _META_SIZE:
        return f"it ends inside its meta page {number}: it is not an LMDB data file"
    (flags,) = _PAGE_FLAGS.unpack_from(meta)
    magic, version = _META_HEAD.unpack_from(meta)
    if not flags & P_META or magic != META_MAGIC:
        return f"its page {number} is not an LMDB meta page: it is not an LMDB data file"
    if version != DATA_VERSION:
        return f"it has LMDB data format {version}, not {DATA_VERSION}"
    return None
