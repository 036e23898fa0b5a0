"""Forking a fleet worker so that it starts with as few pages of its own as possible.

A forked worker shares the supervisor's memory copy-on-write and pays for every
page it writes.  Python 3.11 has no immortal objects, so reading an object writes
its reference count: a worker pays for every page holding an object it touches,
not only for the data it makes.  Two pieces of machinery write many such pages
in every child at fork, for nothing a worker needs:

- :func:`os.fork` runs the interpreter's at-fork hooks in the child: threading's
  bookkeeping, ``random``'s reseeding, ``logging``'s locks; Python code whose
  objects lie on a few hundred pages (measured: a forked child with dksm imported
  dirtied 804 KiB before doing anything, 248 KiB without the hooks).  The hooks
  repair what *other* threads left behind at the fork (locks they held, records
  of threads that no longer exist); a process with one thread left nothing, so
  :func:`fork_worker` then calls the C library's ``fork`` directly, with the GIL
  held, and falls back to :func:`os.fork` whenever the process has other threads.
- the C library's allocator keeps the chunks the supervisor freed on lists; the
  child's first larger allocation consolidates and sorts them, writing into every
  free chunk on pages all over the heap.  :func:`trim_heap` does that once in
  the supervisor (``malloc_trim``, which also returns wholly free pages), after
  its last allocation of note and before the first fork.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would spawn ldconfig
_libc.malloc_trim.argtypes = [ctypes.c_size_t]
_libc.malloc_trim.restype = ctypes.c_int
# PyDLL: the call keeps the GIL, so the child's only thread holds it as it returns.
_fork = ctypes.PyDLL("libc.so.6", use_errno=True).fork
_fork.argtypes = []
_fork.restype = ctypes.c_int


def trim_heap() -> None:
    """Consolidate the C heap's free chunks now and give back its wholly free pages:
    before forking, so that children do not each rewrite the free chunks; in a
    worker, once its VMs are built, so that the pages their building used and
    freed stop counting as its own."""
    _libc.malloc_trim(0)


def single_threaded() -> bool:
    """Whether this process has one thread (C threads included), read from the kernel."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def fork_bare() -> int:
    """Fork without the interpreter's at-fork hooks: only for a process that
    :func:`single_threaded` says has one thread.  0 in the child, the child's pid in
    the parent (like :func:`os.fork`)."""
    pid: int = _fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fork: {os.strerror(err)}")
    return pid


def fork_worker() -> int:
    """:func:`fork_bare` when this process has one thread, else :func:`os.fork`."""
    return fork_bare() if single_threaded() else os.fork()
