"""A tiny initramfs for Linux guests: a newc cpio archive, built byte for byte.

Linux unpacks an uncompressed "newc" cpio archive given as its initrd into its
root file system and runs ``/init`` (``Documentation/driver-api/early-userspace/
buffer-format.rst``).  The archive is written here rather than with ``cpio(1)`` so
that it needs no tool, no root (device nodes are just headers) and comes out the
same on every host: owner root, time 0, inode numbers in order.

Format: each member is the ASCII header ``070701`` followed by thirteen 8-digit
hex fields (inode, mode, uid, gid, nlink, mtime, file size, device major/minor,
rdev major/minor, name size including its NUL, checksum 0), the name, NUL,
padding to 4 bytes, the data, padding to 4 bytes; the archive ends with a member
named ``TRAILER!!!``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
ALIGNMENT = 4

# /dev/console: Linux opens it for init's standard streams before running /init;
# without it init has no output.
CONSOLE_MAJOR = 5
CONSOLE_MINOR = 1


@dataclass(frozen=True)
class Member:
    """One archive member: a directory, a regular file or a character device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def directory(name: str) -> Member:
    return Member(name, stat.S_IFDIR | 0o755)


def regular(name: str, data: bytes, executable: bool = False) -> Member:
    return Member(name, stat.S_IFREG | (0o755 if executable else 0o644), data)


def char_device(name: str, major: int, minor: int) -> Member:
    return Member(name, stat.S_IFCHR | 0o600, rdev=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % ALIGNMENT)


def _header(inode: int, member: Member, name: bytes) -> bytes:
    nlink = 2 if stat.S_ISDIR(member.mode) else 1
    fields = (
        inode,
        member.mode,
        0,  # uid
        0,  # gid
        nlink,
        0,  # mtime: reproducible archives
        len(member.data),
        0,  # device major
        0,  # device minor
        member.rdev[0],
        member.rdev[1],
        len(name) + 1,
        0,  # checksum: unused by newc
    )
    return NEWC_MAGIC + b"".join(b"%08x" % value for value in fields)


def newc_archive(members: list[Member]) -> bytes:
    """The members as one newc archive, in the given order (parents first)."""
    out = bytearray()
    for inode, member in enumerate([*members, Member(TRAILER, 0)], start=1):
        name = member.name.lstrip("/").encode()
        if not name or b"\0" in name:
            raise ValueError(f"bad archive member name {member.name!r}")
        out += _header(0 if member.name == TRAILER else inode, member, name)
        out += name + b"\0"
        out += _pad(len(out))
        out += member.data
        out += _pad(len(out))
    return bytes(out)
