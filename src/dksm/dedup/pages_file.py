"""The pool's pages file: each distinct page stored once, at offset ``slot * PAGE_SIZE``.

The file lives on tmpfs, so its pages are page-cache pages and every private mapping
of a slot shares one physical frame until it writes.  Storage is returned to the
system by punching holes (``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``);
Python's ``os.posix_fallocate`` can only allocate, so the call goes through libc.

Every write and punch here happens while the caller holds the index's write
transaction: the file changes only in step with the index that describes it.

Stored pages are compared with a load's bytes in place, through one read-only shared
mapping of the whole file that lives as long as the open file (and is made again,
larger, when the file has grown past it): a mapping made per comparison would set
up and tear down the page tables of every page compared, each time, which cost more
than the comparison itself.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence

from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE, equals, map_file_readonly, unmap

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_STAT_BLOCK_SIZE = 512  # st_blocks counts 512-byte units whatever the filesystem
# Linux caps one writev at IOV_MAX (1024) buffers.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# The comparison mapping reserves address space in steps this large (it costs no
# memory), so a growing pool is mapped again only every 64 Ki slots.
_VIEW_STEP = 256 << 20

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would spawn ldconfig
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class PagesFileError(DksmError):
    """The pool's pages file could not be read, written or trimmed."""


class PagesFile:
    """Slot-addressed access to one open pages file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._view_address = 0  # the read-only mapping of the file, 0 before first use
        self._view_length = 0
        self._known_size = 0  # the file was at least this long when last looked at
        self._view_lock = threading.Lock()

    def read_into(self, buffer: bytearray, first_slot: int) -> None:
        """Fill ``buffer`` (a whole number of pages) from ``first_slot`` onwards."""
        got = os.preadv(self.fd, [buffer], first_slot * PAGE_SIZE)
        if got != len(buffer):
            raise PagesFileError(
                f"slot {first_slot} lies beyond the end of the pool file: "
                "the pool is damaged (purge it)"
            )

    def read(self, first_slot: int, count: int) -> bytearray:
        buffer = bytearray(count * PAGE_SIZE)
        self.read_into(buffer, first_slot)
        return buffer

    def holds(self, first_slot: int, data: memoryview) -> bool:
        """Whether the slots from ``first_slot`` on hold exactly ``data`` (whole pages).

        Compared in place through the file's read-only mapping (one ``memcmp``), without
        copying the stored pages out: a hole (a punched slot) reads as zeros and so
        differs from any page that is not all zeros."""
        offset = first_slot * PAGE_SIZE
        with self._view_lock:  # another thread may otherwise map the file again meanwhile
            return equals(self._readable(offset + len(data)) + offset, data)

    def check_size(self) -> None:
        """Look at the file's size again at the next comparison (once per transaction):
        a file cut short behind the pool's back must fail a check, not fault."""
        self._known_size = 0

    def _readable(self, end: int) -> int:
        """The address of the file's read-only mapping, once it covers ``[0, end)``
        of a file at least that long (reading past the file's end would be SIGBUS)."""
        if end > self._known_size:
            self._known_size = self.size()
            if end > self._known_size:
                raise PagesFileError(
                    f"slot {end // PAGE_SIZE - 1} lies beyond the end of the pool file: "
                    "the pool is damaged (purge it)"
                )
        if end > self._view_length:
            length = -(-self._known_size // _VIEW_STEP) * _VIEW_STEP
            try:
                address = map_file_readonly(self.fd, 0, length, populate=False)
            except DksmError as error:
                raise PagesFileError(f"cannot read pages of the pool file: {error}") from error
            self._drop_view()
            self._view_address, self._view_length = address, length
        return self._view_address

    def _drop_view(self) -> None:
        if self._view_length:
            unmap(self._view_address, self._view_length)
            self._view_address = self._view_length = 0

    def write(self, first_slot: int, pages: Sequence[memoryview]) -> None:
        """Store ``pages`` (each one page) in consecutive slots from ``first_slot``."""
        offset = first_slot * PAGE_SIZE
        for start in range(0, len(pages), _IOV_MAX):
            group = pages[start : start + _IOV_MAX]
            expected = len(group) * PAGE_SIZE
            try:
                written = os.pwritev(self.fd, group, offset)
            except OSError as error:
                raise PagesFileError(f"cannot store pages in the pool file: {error}") from error
            if written != expected:  # tmpfs writes all or fails; anything else is full
                raise PagesFileError(
                    f"the pool file took {written} of {expected} bytes: is its tmpfs full?"
                )
            offset += expected

    def punch(self, first_slot: int, count: int) -> None:
        """Give the pages of ``count`` slots back to the system; they then read as zeros."""
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, first_slot * PAGE_SIZE, count * PAGE_SIZE) != 0:
            err = ctypes.get_errno()
            raise PagesFileError(
                f"cannot punch slots {first_slot}..{first_slot + count - 1} out of the pool "
                f"file: {os.strerror(err)}"
            )

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_bytes(self) -> int:
        """Bytes of storage the file holds (holes excluded)."""
        return os.fstat(self.fd).st_blocks * _STAT_BLOCK_SIZE

    def close(self) -> None:
        # No lock: nothing compares through a closed file (its store has no users
        # left), and a forked child closing what it inherited may have inherited the
        # lock held by a thread that does not exist in it.
        self._drop_view()
        os.close(self.fd)
