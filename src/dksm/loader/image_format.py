"""What a kernel image is, when it is not what dksm boots: one line for the user.

dksm boots 64-bit ELF kernels through the 64-bit Linux boot protocol, as Firecracker
does on x86 (Unikraft's Firecracker platform, Linux's ``vmlinux``).  Users bring
other builds of the same kernels: Unikraft's QEMU platform (a 32-bit ELF entered
through a multiboot header), a Linux ``bzImage``, a compressed file.  Rather than
"bad magic", they are told what they gave and what to give instead.

Facts: the Multiboot specification 0.6.96 (header magic 0x1BADB002, 4-byte aligned,
in the first 8 KiB) and Multiboot2 (0xE85250D6, 8-byte aligned, first 32 KiB); the
Linux boot protocol (``Documentation/arch/x86/boot.rst``: boot_flag 0xAA55 at 0x1FE,
"HdrS" at 0x202).
"""

from __future__ import annotations

import struct

MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT2_MAGIC = 0xE85250D6
MULTIBOOT2_SEARCH = 32768
SETUP_BOOT_FLAG_OFFSET = 0x1FE
SETUP_HEADER_MAGIC_OFFSET = 0x202
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"

WHAT_DKSM_BOOTS = (
    "dksm boots 64-bit ELF kernels through the Linux boot protocol, as Firecracker does"
)


def _find_magic(data: bytes, magic: int, limit: int, step: int) -> bool:
    packed = struct.pack("<I", magic)
    at = data.find(packed, 0, limit)
    while at != -1:
        if at % step == 0:
            return True
        at = data.find(packed, at + 1, limit)
    return False


def is_bzimage(data: bytes) -> bool:
    return (
        len(data) > SETUP_HEADER_MAGIC_OFFSET + 4
        and data[SETUP_BOOT_FLAG_OFFSET : SETUP_BOOT_FLAG_OFFSET + 2] == b"\x55\xaa"
        and data[SETUP_HEADER_MAGIC_OFFSET : SETUP_HEADER_MAGIC_OFFSET + 4] == b"HdrS"
    )


def describe_unbootable(data: bytes, elf_class: int | None = None) -> str:
    """Why ``data`` cannot be booted and what to use instead (``elf_class`` is the
    ELF class byte when ``data`` is an ELF file of the wrong class)."""
    multiboot = _find_magic(data, MULTIBOOT_MAGIC, MULTIBOOT_SEARCH, 4)
    multiboot2 = _find_magic(data, MULTIBOOT2_MAGIC, MULTIBOOT2_SEARCH, 8)
    if elf_class == 1:
        kind = "a 32-bit ELF"
        if multiboot or multiboot2:
            kind += f" with a multiboot{'2' if multiboot2 and not multiboot else ''} header"
            return (
                f"{kind} (a build for QEMU or GRUB); {WHAT_DKSM_BOOTS}: build the "
                "kernel for Firecracker (for Unikraft, the KVM platform with "
                "CONFIG_KVM_VMM_FIRECRACKER)"
            )
        return f"{kind}; {WHAT_DKSM_BOOTS}: give the 64-bit build of this kernel"
    if is_bzimage(data):
        return (
            f"a Linux bzImage; {WHAT_DKSM_BOOTS}: give the uncompressed vmlinux "
            "(the build's vmlinux, or the kernel tree's scripts/extract-vmlinux run on "
            "this file)"
        )
    for magic, name in ((GZIP_MAGIC, "gzip"), (ZSTD_MAGIC, "zstd"), (XZ_MAGIC, "xz")):
        if data.startswith(magic):
            return f"{name}-compressed data; decompress it first ({WHAT_DKSM_BOOTS})"
    if multiboot or multiboot2:
        return f"a multiboot image; {WHAT_DKSM_BOOTS}: build the kernel for Firecracker"
    return f"not an ELF file (bad magic); {WHAT_DKSM_BOOTS}"
