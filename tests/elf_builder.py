"""Builds small ELF64 images byte by byte, so tests can make every kind of broken one."""

from __future__ import annotations

import struct
from dataclasses import dataclass

PF_X, PF_W, PF_R = 1, 2, 4


@dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None
    flags: int = PF_R | PF_X


def make_elf(
    segments: list[Seg],
    entry: int | None = None,
    *,
    elf_class: int = 2,
    endian: int = 1,
    machine: int = 62,
    phentsize: int = 56,
) -> bytes:
    phoff = 64
    data_off = phoff + 56 * len(segments)
    data_off = (data_off + 0xFFF) & ~0xFFF
    blobs = b""
    phdrs = b""
    for seg in segments:
        offset = data_off + len(blobs)
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, seg.flags, offset, seg.paddr, seg.paddr, len(seg.data), memsz, 0x1000
        )
        blobs += seg.data + b"\0" * (-len(seg.data) % 0x1000)
    if entry is None:
        entry = segments[0].paddr if segments else 0x100000
    ident = b"\x7fELF" + bytes([elf_class, endian, 1, 0]) + b"\0" * 8
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        ident,
        2,
        machine,
        1,
        entry,
        phoff,
        0,
        0,
        64,
        phentsize,
        len(segments),
        64,
        0,
        0,
    )
    image = ehdr + phdrs
    return image + b"\0" * (data_off - len(image)) + blobs
