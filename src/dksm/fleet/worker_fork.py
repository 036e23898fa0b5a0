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
- the interpreter's small-object allocator hands out the free blocks of partly
  used pools first, and after the supervisor's imports and collections such
  blocks lie in most of its pools (measured: ~6,600 blocks in ~440 pools of
  16 KiB), so a worker's first few thousand allocations land one or two to a page
  all over the inherited heap, copying each page.  :func:`fill_allocator_holes`
  fills them in the supervisor with ballast it keeps (a few hundred KiB, shared
  by every worker), so that a worker's allocations come from fresh pools, packed
  together (measured: ~110 KiB less per one-VM worker, ~240 KiB per 8-VM one).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

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


def wait_single_threaded(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for this process's other threads to be gone (a
    joined thread's kernel task ends a moment after); whether they are."""
    deadline = time.monotonic() + timeout
    while not single_threaded():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def fork_bare() -> int:
    """Fork without the interpreter's at-fork hooks: only for a process that
    :func:`single_threaded` says has one thread.  0 in the child, the child's pid in
    the parent (like :func:`os.fork`)."""
    pid: int = _fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fork: {os.strerror(err)}")
    return pid


def fork_worker(one_thread: bool | None = None) -> int:
    """:func:`fork_bare` when this process has one thread, else :func:`os.fork`.
    ``one_thread``: what :func:`single_threaded` said, for a caller forking many
    workers in a row that asked once (None: ask now)."""
    if one_thread is None:
        one_thread = single_threaded()
    return fork_bare() if one_thread else os.fork()


# Objects that fill the allocator's free blocks for the life of the process.
_BALLAST: list[object] = []
# The smallest bytes object's size: its header, and a byte for the terminating NUL.
_BYTES_OVERHEAD = sys.getsizeof(b"")
_INT_SIZE_CLASS = 32  # an int of one 30-bit digit (28 bytes) takes a 32-byte block
_FILL_ROUNDS = 3  # reading the counts frees blocks of its own: fill what that left too


def _free_blocks() -> dict[int, int]:
    """Free blocks in partly used pools, by block size: CPython's allocator report
    (``sys._debugmallocstats``), which it writes to the C stderr, read through a
    memory file.  Empty where the interpreter has no such report."""
    report = getattr(sys, "_debugmallocstats", None)
    if report is None:
        return {}
    memory = os.memfd_create("malloc-stats", os.MFD_CLOEXEC)
    saved = os.dup(2)
    try:
        os.dup2(memory, 2)
        try:
            report()
        finally:
            os.dup2(saved, 2)
        text = os.pread(memory, 1 << 20, 0)
    finally:
        os.close(saved)
        os.close(memory)
    free: dict[int, int] = {}
    # "class  size  num pools  blocks in use  avail blocks", one line per size class.
    for line in text.split(b"\n"):
        fields = line.split()
        if len(fields) == 5 and all(f.isdigit() for f in fields):
            free[int(fields[1])] = int(fields[4])
    return free


def fill_allocator_holes() -> None:
    """Fill the free blocks of the small-object allocator's partly used pools with
    ballast kept for the life of the process (see the module's docstring)."""
    for _ in range(_FILL_ROUNDS):
        for size, count in _free_blocks().items():
            length = size - _BYTES_OVERHEAD
            if size == _INT_SIZE_CLASS:
                _BALLAST.extend([(1 << 20) + i for i in range(count)])
            elif length > 1:  # bytes of length 0 and 1 are shared singletons
                _BALLAST.extend([b"\1" * length for _ in range(count)])
