"""A bzImage boots as the vmlinux inside it: the payload is found through the setup
header and decompressed in every format the kernel's build makes that Python can
read; the others, and damaged payloads, end in one line naming the problem."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import lz4.block
import pytest

from dksm.loader import bzimage
from dksm.loader.elf import parse_elf
from dksm.loader.segment import LoaderError

from conftest import dksm
from elf_builder import PF_R, PF_W, PF_X, Seg, make_elf

MEM = 64 << 20
PROTECTED_MODE_START = 2 * 512  # setup_sects = 1: the boot sector and one more


def _kernel_elf() -> bytes:
    code = bytes(range(256)) * 32  # 8 KiB of "code", two pages
    data = b"\x5a" * 4096
    return make_elf(
        [Seg(0x1000000, code, flags=PF_R | PF_X), Seg(0x1200000, data, flags=PF_R | PF_W)],
        entry=0x1000000,
    )


def _lz4_legacy(data: bytes) -> bytes:
    out = struct.pack("<I", bzimage.LZ4_LEGACY_MAGIC)
    for at in range(0, len(data), bzimage.LZ4_LEGACY_BLOCK_MAX):
        block = lz4.block.compress(data[at : at + bzimage.LZ4_LEGACY_BLOCK_MAX], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


def _compress(kind: str, data: bytes) -> bytes:
    size = struct.pack("<I", len(data))  # the kernel's build appends it (not to gzip)
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
    if kind == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE) + size
    if kind == "bzip2":
        return bz2.compress(data) + size
    if kind == "lz4":
        return _lz4_legacy(data) + size
    raise AssertionError(kind)


def make_bzimage(payload: bytes, version: int = 0x020F) -> bytes:
    """A bzImage-shaped file: setup header, then protected-mode code holding payload."""
    image = bytearray(PROTECTED_MODE_START + 0x400)
    image[0x1F1] = 1  # setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<II", image, 0x248, 0x400, len(payload))
    return bytes(image) + payload + b"\0" * 64


@pytest.mark.parametrize("kind", ["gzip", "xz", "lzma", "bzip2", "lz4"])
def test_a_bzimage_loads_as_the_elf_inside_it(kind: str) -> None:
    elf = _kernel_elf()
    image = parse_elf(make_bzimage(_compress(kind, elf)), MEM, "bz")
    plain = parse_elf(elf, MEM, "elf")
    assert image.entry == plain.entry == 0x1000000
    assert [(s.guest_addr, s.data, s.writable) for s in image.segments] == [
        (s.guest_addr, s.data, s.writable) for s in plain.segments
    ]
    assert bzimage.compression(_compress(kind, elf)) == kind


def test_lz4_blocks_of_eight_mib_are_joined() -> None:
    data = bytes(range(251)) * (((9 << 20) // 251) + 1)  # two blocks
    out = bzimage.decompress(_compress("lz4", data), len(data) + 1, "bz")
    assert out == data


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x28\xb5\x2f\xfd" + bytes(60), "zstd-compressed, which dksm cannot decompress"),
        (b"\x89LZO" + bytes(60), "lzo-compressed, which dksm cannot decompress"),
        (b"\x00\x11\x22\x33\x44\x55" + bytes(60), "a format dksm does not know (first bytes 00 11"),
        (gzip.compress(_kernel_elf())[:300], "the gzip-compressed payload is truncated"),
        (b"\x1f\x8b" + bytes(62), "the gzip-compressed payload is corrupt"),
        (_lz4_legacy(_kernel_elf())[:200], "the LZ4 payload is truncated"),
        (gzip.compress(b"MZ not an elf" * 10), "not an ELF kernel"),
    ],
)
def test_a_payload_dksm_cannot_use_is_named(payload: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=r"^bz: ") as caught:
        parse_elf(make_bzimage(payload), MEM, "bz")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_payload_larger_than_any_guest_kernel_is_refused() -> None:
    bomb = gzip.compress(bytes(8 << 20))
    with pytest.raises(LoaderError, match="decompresses to more than 4194304 bytes"):
        bzimage.decompress(bomb, 4 << 20, "bz")


def test_setup_headers_without_a_payload_are_refused() -> None:
    with pytest.raises(LoaderError, match=r"boot protocol 2\.06 predates the payload fields"):
        parse_elf(make_bzimage(b"x", version=0x0206), MEM, "bz")
    broken = bytearray(make_bzimage(_compress("gzip", _kernel_elf())))
    struct.pack_into("<I", broken, 0x24C, 1 << 30)  # payload_length beyond the file
    with pytest.raises(LoaderError, match="lies outside the file"):
        parse_elf(bytes(broken), MEM, "bz")


def test_dksm_run_names_a_zstd_bzimage_in_one_line(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "vmlinuz"
    path.write_bytes(make_bzimage(b"\x28\xb5\x2f\xfd" + bytes(60)))
    result = dksm("run", "--kernel", str(path), "--dedup", "none")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "zstd-compressed" in result.stderr and "extract-vmlinux" in result.stderr
