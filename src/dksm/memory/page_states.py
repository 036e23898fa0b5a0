"""What backs each page of a process's memory now: ``/proc/PID/pagemap``.

A guest page the loader mapped from the page pool starts as a private mapping of
a tmpfs page.  Read by the guest it is that page-cache frame, shared with every
other VM; written, it becomes an anonymous copy of the guest's own; merged by KSM,
an anonymous KSM page.  pagemap says which, page by page, without touching the
pages (``Documentation/admin-guide/mm/pagemap.rst``): each page has a 64-bit entry,
bit 63 "present", bit 61 "file page or shared anonymous", bit 56 "exclusively
mapped".  Reading another process's pagemap needs the right to ptrace it (root, or
the same user).
"""

from __future__ import annotations

import enum
import os
import struct

PAGE_SIZE = 4096
PAGEMAP_ENTRY = struct.Struct("<Q")
PRESENT = 1 << 63
SWAPPED = 1 << 62
FILE_OR_SHARED = 1 << 61
EXCLUSIVE = 1 << 56


class PageState(enum.Enum):
    """What backs one page of a mapping."""

    ABSENT = "not present"  # never touched: a pool page the guest has not read yet
    FILE = "file page"  # the pool's page-cache frame, shared
    ANONYMOUS = "anonymous"  # a private copy (or a KSM page; see mapped_count)
    SWAPPED = "swapped"


class Pagemap:
    """A process's pagemap, opened once: a process that confines itself opens its own
    before it may no longer open files, and reads it afterwards."""

    def __init__(self, pid: int) -> None:
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    def states(self, address: int, count: int) -> list[PageState]:
        """The state of ``count`` pages from host ``address``."""
        offset = (address // PAGE_SIZE) * PAGEMAP_ENTRY.size
        return _decode(os.pread(self.fd, count * PAGEMAP_ENTRY.size, offset))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def page_states(pid: int, address: int, count: int) -> list[PageState]:
    """The state of ``count`` pages of process ``pid`` from host ``address``."""
    pagemap = Pagemap(pid)
    try:
        return pagemap.states(address, count)
    finally:
        pagemap.close()


def _decode(raw: bytes) -> list[PageState]:
    states = []
    for (entry,) in PAGEMAP_ENTRY.iter_unpack(raw):
        if entry & PRESENT:
            states.append(PageState.FILE if entry & FILE_OR_SHARED else PageState.ANONYMOUS)
        elif entry & SWAPPED:
            states.append(PageState.SWAPPED)
        else:
            states.append(PageState.ABSENT)
    return states
