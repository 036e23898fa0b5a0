"""The kernel ELF inside a Linux bzImage: its payload, found and decompressed.

dksm boots the uncompressed ``vmlinux`` through the 64-bit Linux boot protocol, as
Firecracker does on x86.  A bzImage carries that same ELF, compressed, behind its
real-mode setup code; rather than make users run the kernel tree's
``scripts/extract-vmlinux``, dksm takes the payload out itself and boots the ELF.
Booting the ELF, not the bzImage's own decompressor, also keeps the kernel at
its link address: the decompressor would randomise it (KASLR) and no two VMs
would then hold the same code pages.

Facts (``Documentation/arch/x86/boot.rst``): the setup header at 0x1F1;
``setup_sects`` at 0x1F1 (0 means 4); the protected-mode code starts at
``(setup_sects + 1) * 512``; ``payload_offset`` (u32 at 0x248) and
``payload_length`` (u32 at 0x24C) locate the payload inside it (protocol 2.08
and later: version u16 at 0x206).  The payload's compression is the kernel's
``CONFIG_KERNEL_*`` choice, told by its first bytes; the kernel's build appends
the decompressed size (u32) to every format but gzip.  LZ4 uses the legacy frame
(magic 0x184C2102, then blocks of u32 compressed size + LZ4 block, each at most
8 MiB decompressed), decompressed with the ``lz4`` package; gzip, xz, lzma and
bzip2 with the standard library.  zstd and LZO are named, not decompressed.
"""

from __future__ import annotations

import struct

from dksm.loader.image_format import is_bzimage
from dksm.loader.segment import LoaderError

SETUP_SECTS_OFFSET = 0x1F1
DEFAULT_SETUP_SECTS = 4
SECTOR_SIZE = 512
VERSION_OFFSET = 0x206
PAYLOAD_OFFSET_OFFSET = 0x248
PAYLOAD_LENGTH_OFFSET = 0x24C
MIN_PAYLOAD_VERSION = 0x0208  # payload_offset and payload_length exist from 2.08

ELF_MAGIC = b"\x7fELF"
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK_MAX = 8 << 20
LZ4_SIZE = struct.Struct("<I")

GZIP = "gzip"
XZ = "xz"
LZMA = "lzma"
BZIP2 = "bzip2"
LZ4 = "lz4"
ZSTD = "zstd"
LZO = "lzo"

# First bytes of each payload format (the kernel's compressors' own magics).
_MAGICS = (
    (b"\x1f\x8b", GZIP),
    (b"\xfd7zXZ\x00", XZ),
    (b"\x5d\x00\x00", LZMA),
    (b"BZh", BZIP2),
    (LZ4_SIZE.pack(LZ4_LEGACY_MAGIC), LZ4),
    (b"\x28\xb5\x2f\xfd", ZSTD),
    (b"\x89LZO", LZO),
)
_UNSUPPORTED = {
    ZSTD: "Python's standard library before 3.14 has no zstd",
    LZO: "no maintained LZO library is a dependency of dksm",
}


class BzImageError(LoaderError):
    """The bzImage's payload cannot be found or decompressed; the message says why."""


def compression(payload: bytes) -> str | None:
    """The payload's compression format, by its magic bytes; None if unknown."""
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    return None


def payload(data: bytes, path: str = "<image>") -> bytes:
    """The compressed kernel inside bzImage ``data``."""
    if not is_bzimage(data):
        raise BzImageError(f"{path}: not a Linux bzImage (no 'HdrS' setup header)")
    (version,) = struct.unpack_from("<H", data, VERSION_OFFSET)
    if version < MIN_PAYLOAD_VERSION:
        raise BzImageError(
            f"{path}: boot protocol {version >> 8}.{version & 0xFF:02d} predates the "
            "payload fields (2.08); give the uncompressed vmlinux"
        )
    if len(data) < PAYLOAD_LENGTH_OFFSET + 4:
        raise BzImageError(f"{path}: truncated setup header")
    setup_sects = data[SETUP_SECTS_OFFSET] or DEFAULT_SETUP_SECTS
    start = (setup_sects + 1) * SECTOR_SIZE
    offset, length = struct.unpack_from("<II", data, PAYLOAD_OFFSET_OFFSET)
    end = start + offset + length
    if length == 0 or end > len(data):
        raise BzImageError(
            f"{path}: the payload ({length} bytes at {start + offset:#x}) lies outside "
            f"the file's {len(data)} bytes"
        )
    return data[start + offset : end]


def decompress(compressed: bytes, limit: int, path: str = "<image>") -> bytes:
    """Decompress a bzImage payload; refuse one that grows beyond ``limit`` bytes."""
    kind = compression(compressed)
    if kind is None:
        raise BzImageError(
            f"{path}: the bzImage's payload is compressed in a format dksm does not "
            f"know (first bytes {compressed[:6].hex(' ')})"
        )
    if kind in _UNSUPPORTED:
        raise BzImageError(
            f"{path}: the bzImage's payload is {kind}-compressed, which dksm cannot "
            f"decompress ({_UNSUPPORTED[kind]}); give the uncompressed vmlinux "
            "(the kernel tree's scripts/extract-vmlinux makes it)"
        )
    try:
        if kind == LZ4:
            out = _lz4_legacy(compressed, limit, path)
        else:
            out = _stdlib(kind, compressed, limit, path)
    except BzImageError:
        raise
    except Exception as exc:  # each library has its own error types for corrupt data
        raise BzImageError(f"{path}: the {kind}-compressed payload is corrupt: {exc}") from exc
    if len(out) > limit:
        raise BzImageError(
            f"{path}: the payload decompresses to more than {limit} bytes, larger than "
            "any kernel this guest can hold"
        )
    return out


def _stdlib(kind: str, compressed: bytes, limit: int, path: str) -> bytes:
    import bz2
    import lzma
    import zlib

    decompressor: zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor
    if kind == GZIP:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif kind == BZIP2:
        decompressor = bz2.BZ2Decompressor()
    else:
        # The kernel's xz and lzma payloads end with the appended size: stop at the
        # end of the stream, whatever follows.
        form = lzma.FORMAT_XZ if kind == XZ else lzma.FORMAT_ALONE
        decompressor = lzma.LZMADecompressor(format=form)
    out = decompressor.decompress(compressed, limit + 1)
    if len(out) <= limit and not decompressor.eof:
        raise BzImageError(
            f"{path}: the {kind}-compressed payload is truncated (its stream does not end)"
        )
    return out


def _lz4_legacy(compressed: bytes, limit: int, path: str) -> bytes:
    try:
        import lz4.block
    except ImportError as exc:
        raise BzImageError(
            f"{path}: the bzImage's payload is LZ4-compressed and the lz4 package is "
            "not installed (pip install lz4)"
        ) from exc
    out = bytearray()
    at = LZ4_SIZE.size
    # Blocks follow until the data ends; a repeated magic starts another frame, and
    # the kernel's appended size is the last 4 bytes.
    while at + LZ4_SIZE.size < len(compressed):
        (size,) = LZ4_SIZE.unpack_from(compressed, at)
        at += LZ4_SIZE.size
        if size == LZ4_LEGACY_MAGIC:
            continue
        if at + size > len(compressed):
            raise BzImageError(
                f"{path}: the LZ4 payload is truncated (a {size}-byte block at {at:#x} "
                f"ends beyond its {len(compressed)} bytes)"
            )
        out += lz4.block.decompress(
            compressed[at : at + size], uncompressed_size=LZ4_LEGACY_BLOCK_MAX
        )
        at += size
        if len(out) > limit:
            break
    return bytes(out)


def extract_vmlinux(data: bytes, limit: int, path: str = "<image>") -> bytes:
    """The kernel ELF (``vmlinux``) inside bzImage ``data``, at most ``limit`` bytes."""
    elf = decompress(payload(data, path), limit, path)
    if not elf.startswith(ELF_MAGIC):
        raise BzImageError(
            f"{path}: the bzImage's payload is not an ELF kernel (it starts with "
            f"{elf[:4].hex(' ')})"
        )
    return elf
