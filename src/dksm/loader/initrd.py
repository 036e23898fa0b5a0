"""The initial ramdisk: read once, placed at the top of low RAM, and loaded like a
read-only segment.

A ramdisk given to many VMs is the same bytes in each, and the guest only reads it
(a kernel unpacks it elsewhere, then may reuse its pages): so its whole pages go
through the page pool copy-on-write, exactly as an image's read-only segments do,
and a guest that writes over them gets private copies and harms no one.  The bytes
are kept padded to whole pages (zeros past the end, which is what the guest's RAM
would hold there anyway), so the last page is shared too.

Like images, ramdisks can be read once in a launcher before it forks
(:func:`preload_initrds`), so its workers share those pages too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dksm.arch import layout
from dksm.loader.host_file import read_regular_file
from dksm.loader.segment import PAGE_SIZE, KernelImage, LoaderError, Segment


@dataclass(frozen=True)
class Initrd:
    path: str
    data: bytes  # the file's bytes, zero-padded to whole pages
    size: int  # the file's size: what the guest is told


_preloaded: dict[str, tuple[tuple[int, int, int], Initrd]] = {}


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_initrd(path: str, mem_size: int) -> Initrd:
    """Read ``path``: a regular file no larger than guest RAM (the host-file rules of
    :mod:`dksm.loader.host_file`), or the preloaded bytes of that same file."""
    cached = _preloaded.get(path)
    if cached is not None:
        try:
            if cached[0] == _identity(os.stat(path)) and cached[1].size <= mem_size:
                return cached[1]
        except OSError:
            pass  # gone or unreadable: read_regular_file says why
    data = read_regular_file(path, "initrd", mem_size, f"guest RAM of {mem_size >> 20} MiB")
    padded = data + bytes(-len(data) % PAGE_SIZE)
    return Initrd(path, padded, len(data))


def preload_initrds(paths: set[tuple[str, int]]) -> None:
    """Read each (path, mem_size) now; later :func:`read_initrd` calls reuse the bytes
    while the file is unchanged."""
    for path, mem_size in paths:
        initrd = read_initrd(path, mem_size)
        _preloaded[path] = (_identity(os.stat(path)), initrd)


def place_initrd(initrd: Initrd, mem_size: int, image: KernelImage) -> Segment:
    """The ramdisk as a read-only segment at the top of low RAM (below the MMIO gap),
    page-aligned, above the kernel."""
    top = min(mem_size, layout.MMIO_GAP_START)
    address = (top - len(initrd.data)) & ~(PAGE_SIZE - 1)
    kernel_end = (image.end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if address < kernel_end:
        raise LoaderError(
            f"initrd {initrd.path} ({initrd.size} bytes) does not fit in guest RAM above the kernel"
        )
    return Segment(guest_addr=address, data=initrd.data, mem_size=len(initrd.data), writable=False)
