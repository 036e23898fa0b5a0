"""The zero page alone: every offset dksm writes is the kernel's (asm/bootparam.h),
and the page says what the guest must be told."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import kernel_headers
from dksm.arch import layout
from dksm.loader import boot_params
from dksm.loader.boot_params import BootParams, encode_cmdline
from dksm.loader.segment import LoaderError

# dksm's name -> the member of struct boot_params it stands for.
OFFSETS = {
    "E820_ENTRIES_OFFSET": "e820_entries",
    "BOOT_FLAG_OFFSET": "hdr.boot_flag",
    "HEADER_MAGIC_OFFSET": "hdr.header",
    "TYPE_OF_LOADER_OFFSET": "hdr.type_of_loader",
    "RAMDISK_IMAGE_OFFSET": "hdr.ramdisk_image",
    "RAMDISK_SIZE_OFFSET": "hdr.ramdisk_size",
    "CMD_LINE_PTR_OFFSET": "hdr.cmd_line_ptr",
    "KERNEL_ALIGNMENT_OFFSET": "hdr.kernel_alignment",
    "CMDLINE_SIZE_OFFSET": "hdr.cmdline_size",
    "E820_TABLE_OFFSET": "e820_table",
}


def test_offsets_and_sizes_are_the_kernels(tmp_path: Path) -> None:
    kernel_headers.require_headers("asm/bootparam.h")
    expressions = {name: f"offsetof(struct boot_params, {m})" for name, m in OFFSETS.items()}
    expressions["BOOT_PARAMS_SIZE"] = "sizeof(struct boot_params)"
    expressions["E820_MAX_ENTRIES"] = "E820_MAX_ENTRIES_ZEROPAGE"
    expressions["e820 entry size"] = "sizeof(struct boot_e820_entry)"
    kernel = kernel_headers.evaluate(tmp_path, ["asm/bootparam.h"], expressions)
    ours = {name: getattr(boot_params, name) for name in expressions if name.isupper()}
    ours["e820 entry size"] = boot_params.E820_ENTRY.size
    assert ours == kernel


def _u32(page: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", page, offset)[0]
    return value


def test_the_page_tells_the_kernel_where_its_command_line_and_initrd_are() -> None:
    page = BootParams(64 << 20, b"console=ttyS0", 0x300_0000, 0x1234).encode()
    assert len(page) == boot_params.BOOT_PARAMS_SIZE
    assert struct.unpack_from("<H", page, boot_params.BOOT_FLAG_OFFSET)[0] == 0xAA55
    assert page[boot_params.HEADER_MAGIC_OFFSET : boot_params.HEADER_MAGIC_OFFSET + 4] == b"HdrS"
    assert page[boot_params.TYPE_OF_LOADER_OFFSET] == 0xFF
    assert _u32(page, boot_params.CMD_LINE_PTR_OFFSET) == layout.CMDLINE_ADDR
    assert _u32(page, boot_params.CMDLINE_SIZE_OFFSET) == len(b"console=ttyS0")
    assert _u32(page, boot_params.RAMDISK_IMAGE_OFFSET) == 0x300_0000
    assert _u32(page, boot_params.RAMDISK_SIZE_OFFSET) == 0x1234


@pytest.mark.parametrize("mem_size", [16 << 20, 64 << 20, 1 << 30])
def test_the_e820_map_in_the_page_is_the_layouts(mem_size: int) -> None:
    page = BootParams(mem_size, b"").encode()
    count = page[boot_params.E820_ENTRIES_OFFSET]
    entries = [
        boot_params.E820_ENTRY.unpack_from(page, boot_params.E820_TABLE_OFFSET + i * 20)
        for i in range(count)
    ]
    assert entries == [tuple(e) for e in layout.e820_map(mem_size)]
    ram = sum(size for _, size, kind in entries if kind == 1)
    assert mem_size - (1 << 20) < ram <= mem_size  # all of RAM but the legacy holes
    after = boot_params.E820_TABLE_OFFSET + count * 20
    assert page[after : boot_params.E820_TABLE_OFFSET + 128 * 20] == bytes(20 * (128 - count))


def test_command_lines_are_checked_before_they_are_written() -> None:
    assert encode_cmdline("a=1 b=two") == b"a=1 b=two"
    with pytest.raises(LoaderError, match="non-ASCII character at position 2"):
        encode_cmdline("a=é")
    with pytest.raises(LoaderError, match="NUL byte"):
        encode_cmdline("a\0b")
    longest = "x" * (layout.CMDLINE_MAX_SIZE - 1)
    assert encode_cmdline(longest) == longest.encode()
    with pytest.raises(LoaderError, match=f"at most {layout.CMDLINE_MAX_SIZE - 1} fit"):
        encode_cmdline(longest + "x")
