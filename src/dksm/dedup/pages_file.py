"""The pool's pages file: each distinct page stored once, at offset ``slot * PAGE_SIZE``.

The file lives on tmpfs, so its pages are page-cache pages and every private mapping
of a slot shares one physical frame until it writes.  Storage is returned to the
system by punching holes (``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``);
Python's ``os.posix_fallocate`` can only allocate, so the call goes through libc.

Every write and punch here happens while the caller holds the index's write
transaction: the file changes only in step with the index that describes it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE, equals, map_file_readonly, unmap

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_STAT_BLOCK_SIZE = 512  # st_blocks counts 512-byte units whatever the filesystem
# Linux caps one writev at IOV_MAX (1024) buffers.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would spawn ldconfig
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class PagesFileError(DksmError):
    """The pool's pages file could not be read, written or trimmed."""


class PagesFile:
    """Slot-addressed access to one open pages file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

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

        Compared in place through a read-only mapping of the file, without copying
        the stored pages out: a hole (a punched slot) reads as zeros and so differs
        from any page that is not all zeros."""
        length = len(data)
        offset = first_slot * PAGE_SIZE
        if offset + length > self.size():  # reading past the end would be SIGBUS
            raise PagesFileError(
                f"slot {first_slot + length // PAGE_SIZE - 1} lies beyond the end of the pool "
                "file: the pool is damaged (purge it)"
            )
        try:
            address = map_file_readonly(self.fd, offset, length)
        except DksmError as error:
            raise PagesFileError(f"cannot read pages of the pool file: {error}") from error
        try:
            return equals(address, data)
        finally:
            unmap(address, length)

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
        os.close(self.fd)
