"""Host files a user names (kernel, initrd, config file, console and info outputs):
their paths checked, and input files read only when they are regular files that fit
a size limit.

The loader and the config reader take whole files into memory.  Without these
rules ``/dev/zero`` or an 8 GiB sparse file would exhaust memory, and a FIFO would
block the open for ever, long before any ``--timeout`` applies; a NUL byte or a
lone surrogate in a path would escape as a Python ``ValueError``.  The rules live
here once so that every file dksm reads obeys them.
"""

from __future__ import annotations

import os
import stat

from dksm.error import DksmError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


class HostFileError(DksmError):
    """A path is unusable, or a file is not one dksm may read; the message says which."""


def check_path(path: str, what: str) -> None:
    """Refuse a path the kernel cannot be given: empty, with a NUL byte, or with a
    character (a lone surrogate) that has no file-name encoding."""
    if not path:
        raise HostFileError(f"{what} path is empty")
    if "\0" in path:
        raise HostFileError(f"{what} path {path!r} contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        raise HostFileError(
            f"{what} path {path!r} contains {path[exc.start]!r}, which no file name can hold"
        ) from exc


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check_regular(st: os.stat_result, path: str, what: str, max_size: int, limit: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise HostFileError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_size:
        raise HostFileError(
            f"{what} {path} is {st.st_size} bytes, more than {limit} ({max_size} bytes)"
        )


def read_regular_file(path: str, what: str, max_size: int, limit: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``max_size`` of them.

    ``what`` names the file in errors ("kernel image"); ``limit`` says where the
    limit comes from ("guest RAM of 128 MiB").  The path is checked with ``stat``
    before it is opened, so that no device is ever opened (opening one can have
    effects of its own), and the opened file is checked again with ``fstat``, so
    that a path swapped in between changes nothing; ``O_NONBLOCK`` keeps that open
    from blocking if the swapped-in file is a FIFO.
    """
    check_path(path, what)
    try:
        _check_regular(os.stat(path), path, what, max_size, limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            _check_regular(st, path, what, max_size, limit)
            data = f.read(st.st_size + 1)
    except OSError as exc:
        raise HostFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) != st.st_size:
        raise HostFileError(f"{what} {path} changed size while it was read")
    return data
