"""Raw host mappings through libc: the one place dksm calls mmap, munmap and madvise.

Python's :mod:`mmap` cannot place a mapping at a chosen address (``MAP_FIXED``) nor
tell us where a mapping lives, and both are the whole point here: guest RAM must
have a stable host address for KVM, and the page pool replaces pages of that RAM in
place with private mappings of its file.  So we call libc directly and hand out
plain addresses; :func:`view` wraps an address range as a writable memoryview.
"""

from __future__ import annotations

import ctypes
import errno
import os

from dksm.error import DksmError

PAGE_SIZE = 4096

PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000

MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_NOHUGEPAGE = 15

_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would spawn ldconfig
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.memcmp.restype = ctypes.c_int
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
MAP_SHARED = 0x01
MAP_POPULATE = 0x8000


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (Include/pybuffer.h): only ``buf`` is read here."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_PYBUF_SIMPLE = 0  # a contiguous buffer of bytes
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.restype = ctypes.c_int
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.restype = None
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


class HostMappingError(DksmError):
    """The host refused a mapping request."""


def _fail(what: str) -> HostMappingError:
    err = ctypes.get_errno()
    return HostMappingError(
        f"{what} failed: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})"
    )


def map_anonymous(length: int, *, noreserve: bool = True) -> int:
    """Map ``length`` bytes of private, zero-filled memory; return its address.

    With ``noreserve`` untouched pages cost nothing and are not charged to the
    commit limit, which is what guest RAM wants: a 16 MiB guest that touches 300 KiB
    costs 300 KiB.
    """
    flags = MAP_PRIVATE | MAP_ANONYMOUS | (MAP_NORESERVE if noreserve else 0)
    addr = _libc.mmap(None, length, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr is None or addr == _MAP_FAILED:
        raise _fail(f"mapping {length} bytes of anonymous memory")
    return int(addr)


def map_guarded(length: int) -> int:
    """:func:`map_anonymous` (``noreserve``) between two inaccessible guard pages;
    return the address of the accessible part.  Release with :func:`unmap_guarded`.

    For guest RAM: the kernel merges adjacent anonymous mappings of equal flags, so
    the RAM of VMs mapped one after another in one process became one mapping,
    which ``/proc/PID/smaps`` cannot split between them; with guard pages each
    VM's RAM is a mapping of its own, and a host-side access past one VM's RAM
    faults instead of reaching the next VM's."""
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
    base = _libc.mmap(None, length + 2 * PAGE_SIZE, PROT_NONE, flags, -1, 0)
    if base is None or base == _MAP_FAILED:
        raise _fail(f"mapping {length} bytes of anonymous memory")
    try:
        map_anonymous_fixed(int(base) + PAGE_SIZE, length)
    except BaseException:
        _libc.munmap(base, length + 2 * PAGE_SIZE)
        raise
    return int(base) + PAGE_SIZE


def unmap_guarded(address: int, length: int) -> None:
    """Unmap what :func:`map_guarded` mapped at ``address``, guard pages included."""
    unmap(address - PAGE_SIZE, length + 2 * PAGE_SIZE)


def map_file_private_fixed(address: int, length: int, fd: int, offset: int) -> None:
    """Replace ``[address, address+length)`` with a copy-on-write view of a file.

    Reads see the file's page-cache frames (shared with every other private mapping
    of the same file range); the first write to a page gives this process a private
    copy and leaves the file untouched.
    """
    addr = _libc.mmap(address, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        raise _fail(f"mapping {length} bytes of fd {fd} at offset {offset:#x}")
    if addr != address:  # MAP_FIXED never moves a mapping; anything else is a kernel bug
        raise HostMappingError(f"mmap placed the mapping at {addr:#x}, not {address:#x}")


def map_anonymous_fixed(address: int, length: int) -> None:
    """Replace ``[address, address+length)`` with fresh zero-filled private memory."""
    flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED
    addr = _libc.mmap(address, length, PROT_READ | PROT_WRITE, flags, -1, 0)
    if addr is None or addr == _MAP_FAILED:
        raise _fail(f"remapping {length} bytes at {address:#x} as anonymous memory")


def unmap(address: int, length: int) -> None:
    if _libc.munmap(address, length) != 0:
        raise _fail(f"unmapping {length} bytes at {address:#x}")


def advise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(address, length, advice) != 0:
        raise _fail(f"madvise({advice}) of {length} bytes at {address:#x}")


def resident_pages(fd: int, length: int) -> int:
    """How many of the first ``length`` bytes' pages of file ``fd`` are in the page
    cache (``mincore`` of a read-only shared mapping, which faults nothing in)."""
    if length <= 0:
        return 0
    addr = _libc.mmap(None, length, PROT_READ, MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        raise _fail(f"mapping {length} bytes of fd {fd} to look at its page cache")
    try:
        pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, length, vector) != 0:
            raise _fail("mincore")
        return sum(b & 1 for b in vector)
    finally:
        _libc.munmap(addr, length)


def map_file_readonly(fd: int, offset: int, length: int, *, populate: bool = True) -> int:
    """Map ``length`` bytes of file ``fd`` from ``offset`` read-only and shared; with
    ``populate`` its page-table entries are filled at once (``MAP_POPULATE``: one
    system call instead of a fault per page, which costs microseconds on a virtualised
    host), else each page is filled when first read.  The caller unmaps it; reading
    past the file's end is SIGBUS (the mapping itself may reach further)."""
    flags = MAP_SHARED | (MAP_POPULATE if populate else 0)
    addr = _libc.mmap(None, length, PROT_READ, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        raise _fail(f"mapping {length} bytes of fd {fd} at offset {offset:#x} to read them")
    return int(addr)


def equals(address: int, data: bytes | bytearray | memoryview) -> bool:
    """Whether the ``len(data)`` bytes at ``address`` are ``data``'s: one ``memcmp``,
    no copy.  Python compares two memoryviews item by item (about 3 ns a byte), and
    bytes with a memoryview not at all, whence libc."""
    buffer = _PyBuffer()
    _get_buffer(data, ctypes.byref(buffer), _PYBUF_SIMPLE)  # raises for a strided view
    try:
        return bool(buffer.len == 0 or _libc.memcmp(address, buffer.buf, buffer.len) == 0)
    finally:
        _release_buffer(ctypes.byref(buffer))


def view(address: int, length: int) -> memoryview:
    """A writable memoryview of ``length`` bytes at ``address`` (no copy).

    The caller keeps the mapping alive for as long as the view is used.
    """
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")
