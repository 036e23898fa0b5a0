"""Which directories and files the page pool trusts, and how it opens them.

A pool is memory that guests execute: whoever can change its pages file or its
index decides what code the owner's VMs run, and whoever can plant a name in it can
make the owner write or delete files elsewhere.  The pool root usually sits in
``/dev/shm``, where every user may create names.  So a pool is made of directories
and files that only its owner (the effective user) can change, reached without
following any name another user could have placed:

1. **The way to the pool root is safe.**  The directory above the root is resolved
   once, then walked from ``/`` one component at a time without following symlinks;
   each directory on the way is owned by root or by the effective user, and nobody
   else may write it unless it is sticky (``/dev/shm`` and ``/tmp`` are 1777: the
   sticky bit stops other users from renaming or removing what we put there).
2. **Every pool directory is ours alone.**  The pool root, each domain directory and
   ``index/`` are created 0700 by the effective user; when they exist already they
   must be directories (not symlinks) owned by the effective user that no group or
   other user may write.  So only the owner can add, rename or remove names in them.
3. **Open relative to a checked descriptor, never by path, then check again.**
   Every directory and file is opened with ``openat`` on the descriptor of its
   already-checked parent, with ``O_NOFOLLOW`` (and ``O_DIRECTORY`` for
   directories), then checked with ``fstat``: the expected type, owned by the
   effective user, no group or other write, and for files a single link.  What was
   checked is what is used: renaming or replacing a name afterwards changes nothing
   for a descriptor already held.
4. **Temporary files are created exclusively** (``O_EXCL``, which never follows a
   symlink), and leftovers are removed with ``unlinkat``, which removes a name,
   never what a symlink points to -- and only names that are ours.

Anything else is refused with one line saying which path, what is wrong with it and
how to fix it.  The checks cost a few system calls per pool opened, nothing per page.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from dksm.error import DksmError

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Final, NoReturn

# O_NONBLOCK: a FIFO planted under a file's name must not block the open; it is
# refused as soon as fstat shows what it is.
_DIRECTORY_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WALK_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_GROUP_OTHER_WRITE: Final = stat.S_IWGRP | stat.S_IWOTH
DIRECTORY_MODE: Final = 0o700
FILE_MODE: Final = 0o600

FileIdentity = tuple[int, int]
"""(st_dev, st_ino): a file as the kernel tells it apart from every other."""


class UntrustedPathError(DksmError):
    """A pool path is not safe to use: another user could change or redirect it."""


def identity(fd: int) -> FileIdentity:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _writers(mode: int) -> str:
    group, other = mode & stat.S_IWGRP, mode & stat.S_IWOTH
    return "its group and others" if group and other else "its group" if group else "others"


def check_owned(st: os.stat_result, what: str, shown: str, fix: str, *, directory: bool) -> None:
    """Refuse ``st`` unless it is a directory (or a single-link regular file) owned
    by the effective user that no group or other user may write."""
    me = os.geteuid()
    expected = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    if not expected:
        wanted = "a directory" if directory else "a regular file"
        raise UntrustedPathError(f"{what} {shown} is {_kind(st.st_mode)}, not {wanted}: {fix}")
    if st.st_uid != me:
        raise UntrustedPathError(
            f"{what} {shown} is owned by uid {st.st_uid}, not by you (uid {me}): {fix}"
        )
    if st.st_mode & _GROUP_OTHER_WRITE:
        raise UntrustedPathError(
            f"{what} {shown} is writable by {_writers(st.st_mode)} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): {fix}, or 'chmod go-w' it if you "
            "are sure nobody else changed it"
        )
    if not directory and st.st_nlink != 1:
        raise UntrustedPathError(
            f"{what} {shown} has {st.st_nlink} links, so another name could change it: {fix}"
        )


def _check_on_the_way(st: os.stat_result, shown: str, root: str) -> None:
    """Rule 1: a directory above the pool root nobody but root and us can rename."""
    me = os.geteuid()
    fix = "choose a pool root (--pool-root) in a directory only root or you can change"
    if st.st_uid not in (0, me):
        raise UntrustedPathError(
            f"directory {shown} above the pool root {root} is owned by uid {st.st_uid}, "
            f"not by root or you (uid {me}): {fix}"
        )
    if st.st_mode & _GROUP_OTHER_WRITE and not st.st_mode & stat.S_ISVTX:
        raise UntrustedPathError(
            f"directory {shown} above the pool root {root} is writable by "
            f"{_writers(st.st_mode)} and not sticky (mode {stat.S_IMODE(st.st_mode):04o}), "
            f"so they could replace the pool root: {fix}"
        )


def _refuse_odd_entry(parent_fd: int, name: str, what: str, shown: str, fix: str) -> NoReturn:
    """An open with O_NOFOLLOW failed on an existing name: say what it is instead."""
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    kind = _kind(st.st_mode)
    raise UntrustedPathError(f"{what} {shown} is {kind}, not what dksm made: {fix}")


def open_pool_root(root: str, *, create: bool) -> int:
    """A descriptor of the pool root, checked (rules 1 and 2), created if asked.

    ``root`` is absolute.  Raises FileNotFoundError when it is missing and
    ``create`` is False.  Missing directories on the way are created too (0700).
    """
    parent, name = os.path.split(root)
    if not os.path.isabs(root) or not name or name in (".", ".."):
        raise UntrustedPathError(f"the pool root must be a directory below /, not {root}")
    parent_fd = _walk_to(parent, root, create=create)
    try:
        return open_directory(
            parent_fd, name, root, "pool root", "remove it or choose --pool-root",
            create=create,
        )  # fmt: skip
    finally:
        os.close(parent_fd)


def _walk_to(directory: str, root: str, *, create: bool) -> int:
    """An O_PATH descriptor of ``directory`` (symlinks resolved once), every
    directory from / down to it checked by rule 1."""
    real = os.path.realpath(directory)
    fd = os.open("/", _WALK_FLAGS)
    try:
        _check_on_the_way(os.fstat(fd), "/", root)
        shown = "/"
        for part in real.split("/"):
            if not part:  # the leading "/" (realpath leaves no empty or "." part)
                continue
            shown = os.path.join(shown, part)
            try:
                next_fd = os.open(part, _WALK_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, DIRECTORY_MODE, dir_fd=fd)
                next_fd = os.open(part, _WALK_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
                check_owned(os.fstat(fd), "directory", shown, "remove it", directory=True)
                continue
            except OSError as error:
                if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                # A symlink that appeared since realpath() looked, or a non-directory.
                _refuse_odd_entry(
                    fd, part, "directory", shown, f"the way to the pool root {root} changed"
                )
            os.close(fd)
            fd = next_fd
            _check_on_the_way(os.fstat(fd), shown, root)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_directory(
    parent_fd: int, name: str, shown: str, what: str, fix: str, *, create: bool
) -> int:
    """A descriptor of directory ``name`` under ``parent_fd``, checked (rules 2, 3),
    created 0700 if asked.  FileNotFoundError when missing and not ``create``."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, DIRECTORY_MODE, dir_fd=parent_fd)
    try:
        fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=parent_fd)
    except OSError as error:
        if error.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        _refuse_odd_entry(parent_fd, name, what, shown, fix)
    try:
        check_owned(os.fstat(fd), what, shown, fix, directory=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str, flags: int, shown: str, fix: str) -> int:
    """A descriptor of regular file ``name`` under ``dir_fd``, checked (rule 3).

    ``flags`` may hold ``O_CREAT`` (the file is made 0600 when missing); the file
    may exist already (shared files such as the lock).  FileNotFoundError when it is
    missing and ``O_CREAT`` is not given, or the directory was removed meanwhile.
    """
    try:
        fd = os.open(name, flags | _FILE_FLAGS, FILE_MODE, dir_fd=dir_fd)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        _refuse_odd_entry(dir_fd, name, "pool file", shown, fix)
    try:
        check_owned(os.fstat(fd), "pool file", shown, fix, directory=False)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_file(dir_fd: int, name: str, shown: str) -> int:
    """Create regular file ``name`` under ``dir_fd`` (0600, read-write), failing if
    any name -- a symlink included -- is there already (rule 4)."""
    try:
        return os.open(
            name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, FILE_MODE, dir_fd=dir_fd
        )
    except FileExistsError:
        raise UntrustedPathError(
            f"pool file {shown} appeared while dksm was creating it: another process "
            "writes this pool directory"
        ) from None


def existing_file(dir_fd: int, name: str, shown: str, fix: str) -> bool:
    """Whether ``name`` exists under ``dir_fd``; if it does it must pass rule 3 (as
    a name: a flag file such as ``ready`` is never read)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    check_owned(st, "pool file", shown, fix, directory=False)
    return True


def same_file(dir_fd: int, name: str, fd: int) -> bool:
    """Whether ``name`` under ``dir_fd`` still is the file open as ``fd``."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == identity(fd)


def remove_name(dir_fd: int, name: str, shown: str) -> bool:
    """Unlink ``name`` under ``dir_fd`` if it is ours and not a directory: a file,
    or a symlink (only the link goes, never its target).  False if it is absent;
    raises if it is another user's or a directory."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise UntrustedPathError(f"{shown} is a directory, which dksm never makes there")
    if st.st_uid != os.geteuid():
        raise UntrustedPathError(
            f"{shown} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}): "
            "dksm removes only its own files"
        )
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def open_descriptors() -> set[tuple[int, FileIdentity]]:
    """This process's open descriptors, each with the file it refers to."""
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            st = os.fstat(fd)
        except OSError:  # the listing's own descriptor, closed already
            continue
        found.add((fd, (st.st_dev, st.st_ino)))
    return found


def names_in(dir_fd: int) -> list[str]:
    """The names in a directory open for reading."""
    return os.listdir(dir_fd)
