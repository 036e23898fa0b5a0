"""The Linux zero page (``struct boot_params``) and the command line.

Only the fields a 64-bit-entry kernel reads are set (docs/BOOT.md, "Zero page fields");
the rest of the 4 KiB page stays zero, or holds the image's own setup header when
the image is a bzImage.
"""

from __future__ import annotations

import struct

from dksm.arch import layout
from dksm.loader.segment import LoaderError
from dksm.value import Value

BOOT_PARAMS_SIZE = 4096

E820_ENTRIES_OFFSET = 0x1E8
BOOT_FLAG_OFFSET = 0x1FE
HEADER_MAGIC_OFFSET = 0x202
TYPE_OF_LOADER_OFFSET = 0x210
RAMDISK_IMAGE_OFFSET = 0x218
RAMDISK_SIZE_OFFSET = 0x21C
CMD_LINE_PTR_OFFSET = 0x228
KERNEL_ALIGNMENT_OFFSET = 0x230
CMDLINE_SIZE_OFFSET = 0x238
E820_TABLE_OFFSET = 0x2D0
E820_MAX_ENTRIES = 128

BOOT_FLAG = 0xAA55
HEADER_MAGIC = 0x53726448  # "HdrS"
TYPE_OF_LOADER_UNDEFINED = 0xFF
KERNEL_ALIGNMENT = 0x0100_0000

E820_ENTRY = struct.Struct("<QQI")


class BootParams(Value):
    """What the guest is told at boot: RAM map, command line, initrd."""

    __slots__ = ("cmdline", "initrd_addr", "initrd_size", "mem_size")

    def __init__(
        self,
        mem_size: int,
        cmdline: bytes,
        initrd_addr: int = 0,
        initrd_size: int = 0,
    ) -> None:
        self.mem_size = mem_size
        self.cmdline = cmdline
        self.initrd_addr = initrd_addr
        self.initrd_size = initrd_size

    def encode(self) -> bytes:
        page = bytearray(BOOT_PARAMS_SIZE)
        struct.pack_into("<H", page, BOOT_FLAG_OFFSET, BOOT_FLAG)
        struct.pack_into("<I", page, HEADER_MAGIC_OFFSET, HEADER_MAGIC)
        page[TYPE_OF_LOADER_OFFSET] = TYPE_OF_LOADER_UNDEFINED
        struct.pack_into("<I", page, CMD_LINE_PTR_OFFSET, layout.CMDLINE_ADDR)
        struct.pack_into("<I", page, CMDLINE_SIZE_OFFSET, len(self.cmdline))
        struct.pack_into("<I", page, KERNEL_ALIGNMENT_OFFSET, KERNEL_ALIGNMENT)
        struct.pack_into("<I", page, RAMDISK_IMAGE_OFFSET, self.initrd_addr)
        struct.pack_into("<I", page, RAMDISK_SIZE_OFFSET, self.initrd_size)
        table = layout.e820_map(self.mem_size)
        page[E820_ENTRIES_OFFSET] = len(table)
        for i, entry in enumerate(table):
            E820_ENTRY.pack_into(page, E820_TABLE_OFFSET + i * E820_ENTRY.size, *entry)
        return bytes(page)


def encode_cmdline(text: str) -> bytes:
    """The command line as the guest reads it, checked against the space for it."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise LoaderError(
            f"command line has a non-ASCII character at position {exc.start}"
        ) from exc
    if b"\0" in raw:
        raise LoaderError("command line contains a NUL byte")
    if len(raw) + 1 > layout.CMDLINE_MAX_SIZE:
        raise LoaderError(
            f"command line is {len(raw)} bytes; at most {layout.CMDLINE_MAX_SIZE - 1} fit"
        )
    return raw
