"""Unix sockets a confined VMM made and may no longer remove, removed by the process
that stayed privileged for it (its guardian) once the VMM has ended.

A vsock device listens on a socket file it creates at build, while the process is
still privileged.  Once confined, the VMM is another user, and its seccomp filter
refuses ``unlink`` (one system call that takes any path is one too many for a
process that may be a guest's foothold).  So the guardian, the parent that forked
the VMM before anything was built, keeps a pipe open to it: the VMM writes down each
socket it makes (its absolute path and inode) before it is confined, and after the
VMM has ended the guardian removes every one of them that is still that socket,
never a file someone put there since.
"""

from __future__ import annotations

import contextlib
import os
import stat

_report_fd: int | None = None
# The longest record: a Unix socket's path (at most 107 bytes), its inode in decimal
# and two NULs.
RECORD_MAX = 108 + 20 + 2


def report_to(fd: int | None) -> None:
    """Where :func:`report` writes (a guardian's pipe), in the VMM process."""
    global _report_fd
    _report_fd = fd


def report(path: str, inode: int) -> None:
    """Note a socket this process made, for its guardian to remove (nothing without
    a guardian: the process then removes it itself, as it stays able to)."""
    if _report_fd is None:
        return
    record = os.fsencode(os.path.abspath(path)) + b"\0" + str(inode).encode() + b"\0"
    os.write(_report_fd, record)


def remove_reported(fd: int) -> list[str]:
    """Read every record on ``fd`` (to its end: the VMM has ended; or, on a
    non-blocking ``fd``, to what is there) and remove each socket still there with
    the inode it was made with; the paths removed."""
    data = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            data += chunk
    fields = bytes(data).split(b"\0")
    removed = []
    for raw_path, raw_inode in zip(fields[0:-1:2], fields[1::2], strict=False):
        path = os.fsdecode(raw_path)
        with contextlib.suppress(OSError, ValueError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == int(raw_inode):
                os.unlink(path)
                removed.append(path)
    return removed
