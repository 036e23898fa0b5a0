"""ELF64 kernel images: the ``PT_LOAD`` segments, placed at their physical addresses.

Parsing is done here with :mod:`struct` over the few header fields a loader needs,
so that loading costs no import of a general ELF library (``analyze`` uses
pyelftools for sections and symbols).  Every check that can fail on a malformed or
hostile file happens before anything is mapped, and each failure names the problem.
"""

from __future__ import annotations

import itertools
import os
import struct

from dksm.arch import layout
from dksm.loader.host_file import read_regular_file
from dksm.loader.image_format import describe_unbootable, is_bzimage
from dksm.loader.segment import PAGE_SIZE, KernelImage, LoaderError, Segment

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
PF_X = 0x1
PF_W = 0x2

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
MAX_PROGRAM_HEADERS = 256


class _Load:
    """A checked ``PT_LOAD`` header: guest range, file range, flags."""

    __slots__ = ("end", "file_size", "flags", "offset", "start")

    def __init__(self, start: int, end: int, offset: int, file_size: int, flags: int) -> None:
        self.start = start
        self.end = end
        self.offset = offset
        self.file_size = file_size
        self.flags = flags


def _mib(n: int) -> str:
    return f"{n / layout.MIB:g} MiB"


# Images parsed ahead of time by a process that is about to fork many VMs, so that
# the children share one parsed copy instead of each reading its own.
_preloaded: dict[tuple[str, int], tuple[tuple[int, int, int], KernelImage]] = {}


def _file_identity(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def preload_images(images: set[tuple[str, int]]) -> None:
    """Parse each (path, mem_size) now; later :func:`load_elf` calls reuse the result
    while the file is unchanged."""
    for path, mem_size in images:
        image = load_elf(path, mem_size)
        _preloaded[(path, mem_size)] = (_file_identity(path), image)


def load_elf(path: str, mem_size: int) -> KernelImage:
    """Parse ``path`` and check that it fits a guest with ``mem_size`` bytes of RAM."""
    cached = _preloaded.get((path, mem_size))
    if cached is not None:
        try:
            if _file_identity(path) == cached[0]:
                return cached[1]
        except OSError:
            pass
    data = read_regular_file(path, "kernel image", mem_size, f"guest RAM of {_mib(mem_size)}")
    return parse_elf(data, mem_size, path)


def _size_limit(mem_size: int) -> int:
    """The largest vmlinux worth decompressing from a bzImage for a guest of
    ``mem_size`` bytes (the ELF file holds more than the segments it loads)."""
    return mem_size + layout.HIMEM_START + (64 << 20)


def parse_elf(data: bytes, mem_size: int, path: str = "<image>") -> KernelImage:
    """Segments and entry of the ELF kernel ``data`` (or of the vmlinux inside a
    bzImage, see :mod:`dksm.loader.bzimage`)."""
    if len(data) < 4 or data[:4] != ELF_MAGIC:
        if not is_bzimage(data):
            raise LoaderError(f"{path}: {describe_unbootable(data)}")
        from dksm.loader.bzimage import extract_vmlinux

        data = extract_vmlinux(data, _size_limit(mem_size), path)
    if len(data) < EHDR.size:
        raise LoaderError(f"{path}: truncated ELF header ({len(data)} bytes, need {EHDR.size})")
    (
        ident,
        e_type,
        e_machine,
        _version,
        entry,
        phoff,
        _shoff,
        _flags,
        _ehsize,
        phentsize,
        phnum,
        _shentsize,
        _shnum,
        _shstrndx,
    ) = EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64:
        raise LoaderError(f"{path}: {describe_unbootable(data, ident[4])}")
    if ident[5] != ELFDATA2LSB:
        raise LoaderError(f"{path}: a big-endian ELF; x86-64 images are little-endian")
    if e_machine != EM_X86_64:
        raise LoaderError(f"{path}: ELF machine {e_machine} is not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise LoaderError(f"{path}: ELF type {e_type} is not an executable (ET_EXEC)")
    if phentsize != PHDR.size:
        raise LoaderError(f"{path}: program header size {phentsize}, expected {PHDR.size}")
    if phnum == 0 or phnum > MAX_PROGRAM_HEADERS:
        raise LoaderError(f"{path}: {phnum} program headers (expected 1 to {MAX_PROGRAM_HEADERS})")
    if phoff + phnum * PHDR.size > len(data):
        raise LoaderError(f"{path}: truncated: program headers end beyond the file")

    # Every header is checked before any byte is copied: copying first let an image
    # whose last check fails (an overlap, the entry point) allocate up to 256 times
    # its own size on the way to its error.
    loads: list[_Load] = []
    for i in range(phnum):
        (p_type, p_flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align) = PHDR.unpack_from(
            data, phoff + i * PHDR.size
        )
        if p_type != PT_LOAD:
            continue
        where = f"{path}: segment {i}"
        if p_filesz > p_memsz:
            raise LoaderError(f"{where}: file size {p_filesz} exceeds memory size {p_memsz}")
        if p_offset + p_filesz > len(data):
            raise LoaderError(
                f"{where}: truncated: its bytes end at {p_offset + p_filesz:#x}, "
                f"beyond the file's {len(data):#x}"
            )
        if p_paddr < layout.BOOT_STRUCTURES_END:
            raise LoaderError(
                f"{where} starts at {p_paddr:#x}, inside the boot structures "
                f"below {layout.HIMEM_START:#x}"
            )
        end = p_paddr + p_memsz
        if end > mem_size:
            raise LoaderError(f"{where} ends at {end:#x}, beyond guest RAM of {_mib(mem_size)}")
        if p_memsz == 0:
            continue
        loads.append(_Load(p_paddr, end, p_offset, p_filesz, p_flags))
    if not loads:
        raise LoaderError(f"{path}: no loadable (PT_LOAD) segment")
    loads.sort(key=lambda load: (load.start, load.end))
    for before, after in itertools.pairwise(loads):
        if after.start < before.end:
            raise LoaderError(
                f"{path}: segments at {before.start:#x}-{before.end:#x} and "
                f"{after.start:#x}-{after.end:#x} overlap"
            )
    if entry < layout.HIMEM_START:
        raise LoaderError(f"{path}: entry point {entry:#x} is below 1 MiB")
    if not any(load.start <= entry < load.end for load in loads):
        raise LoaderError(f"{path}: entry point {entry:#x} lies outside every segment")
    segments = [
        Segment(
            guest_addr=load.start,
            data=data[load.offset : load.offset + load.file_size],
            mem_size=load.end - load.start,
            writable=bool(load.flags & PF_W),
            executable=bool(load.flags & PF_X),
        )
        for load in loads
    ]
    return KernelImage(path=path, segments=tuple(segments), entry=entry)


def page_floor(addr: int) -> int:
    return addr & ~(PAGE_SIZE - 1)


def page_ceil(addr: int) -> int:
    return (addr + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
