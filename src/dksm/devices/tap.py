"""Tap devices: a guest's network interface seen from the host.

dksm attaches to a tap that already exists (made with ``ip tuntap add NAME mode
tap``, by whoever set up the host's network) and is up; it never creates one.
Opening a tap by name with ``TUNSETIFF`` would create a fresh, non-persistent one
if the name were free, so the checks come first (the name resolves to an
interface, which is up) and the result is checked after (the tap is a persistent
tap device, not one we just made).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct

from dksm.error import DksmError

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16

# ioctls (linux/if_tun.h, linux/sockios.h) and interface flags (linux/if.h).
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
SIOCGIFFLAGS = 0x8913
IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_PERSIST = 0x0800

IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then flags in the union (40 bytes)


class TapError(DksmError):
    """A tap device cannot be used; the message names it and says why."""


def check_name(name: str) -> bytes:
    raw = name.encode("ascii", "replace")
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.strip() != raw:
        raise TapError(f"'{name}' is not a valid network interface name (1 to 15 characters)")
    return raw


def interface_flags(name: str) -> int:
    raw = check_name(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = bytearray(IFREQ.pack(raw, 0))
        fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request, True)
        return int(IFREQ.unpack(request)[1])


def check_tap(name: str) -> None:
    """Refuse a name that is not an existing interface, or one that is down."""
    check_name(name)
    # SIOCGIFFLAGS, unlike if_nametoindex, keeps its errno: a missing interface
    # (ENODEV) is told apart from a host out of descriptors or sockets.
    try:
        flags = interface_flags(name)
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise TapError(
                f"tap device {name} does not exist (create it with: ip tuntap add {name} mode tap)"
            ) from None
        raise TapError(
            f"cannot read the flags of network interface {name}: {exc.strerror}"
        ) from exc
    if not flags & IFF_UP:
        raise TapError(f"tap device {name} is down (bring it up with: ip link set {name} up)")


def open_tap(name: str) -> int:
    """An open, non-blocking descriptor on the existing tap ``name`` (frames without
    the packet-information header)."""
    raw = check_name(name)
    check_tap(name)
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TapError(f"cannot open {TUN_DEVICE} for tap {name}: {exc.strerror}") from exc
    try:
        request = bytearray(IFREQ.pack(raw, IFF_TAP | IFF_NO_PI))
        try:
            fcntl.ioctl(fd, TUNSETIFF, request, True)
        except OSError as exc:
            reason = {
                16: "it is in use by another process",  # EBUSY
                22: "it is not a tap device",  # EINVAL
                1: "permission denied (CAP_NET_ADMIN or the tap's owner is needed)",  # EPERM
            }.get(exc.errno or 0, exc.strerror)
            raise TapError(f"cannot attach to tap device {name}: {reason}") from exc
        fcntl.ioctl(fd, TUNGETIFF, request, True)
        got = IFREQ.unpack(request)[1]
        if not got & IFF_PERSIST or not got & IFF_TAP:
            raise TapError(f"tap device {name} vanished while it was being opened")
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return fd
