"""The virtio devices of a VM config: drives, network interfaces, vsock, entropy.

Plain frozen dataclasses that any front end fills (flags, Firecracker's config
file, its API), with Firecracker's field names so its bodies map one to one.  The
bodies themselves (shapes, types, unknown fields) are :mod:`dksm.vmm.schema`'s; the
rules here are those a well-formed body can still break (an id's characters, a tap
name's length, a path the kernel cannot take, a multicast MAC address).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dksm.error import DksmError
from dksm.loader.host_file import HostFileError, check_path

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.vmm.schema import Drive, NetworkInterface, Vsock

# Firecracker's resource IDs: alphanumerics and underscores, 1 to 64 characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9_]{1,64}\Z")
MAC_PATTERN = re.compile(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}\Z")
CACHE_TYPES = ("Unsafe", "Writeback")
IO_ENGINES = ("Sync", "Async")
# vsock CIDs 0 (hypervisor), 1 (loopback) and 2 (the host) are taken; CIDs are 32-bit.
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFF_FFFF


class DeviceConfigError(DksmError):
    """A device section of the VM configuration is invalid; the message names it."""


@dataclass(frozen=True)
class DriveConfig:
    """A virtio-block device backed by a host file (Firecracker's ``drives`` entry)."""

    drive_id: str
    path_on_host: str
    is_root_device: bool = False
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: str = "Unsafe"

    def validate(self) -> None:
        _check_id(self.drive_id, "drive")
        _check_path(self.path_on_host, f"drive {self.drive_id}: path_on_host")
        if self.cache_type not in CACHE_TYPES:
            raise DeviceConfigError(
                f"drive {self.drive_id}: cache_type must be one of {', '.join(CACHE_TYPES)}, "
                f"not '{self.cache_type}'"
            )
        if self.partuuid is not None and not re.fullmatch(r"[0-9A-Fa-f-]{1,36}", self.partuuid):
            raise DeviceConfigError(f"drive {self.drive_id}: '{self.partuuid}' is not a partuuid")


@dataclass(frozen=True)
class NetworkInterfaceConfig:
    """A virtio-net device on a host tap (Firecracker's ``network-interfaces`` entry)."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None

    def validate(self) -> None:
        _check_id(self.iface_id, "network interface")
        name = self.host_dev_name
        if (
            not name
            or len(name.encode(errors="replace")) > 15
            or not name.isprintable()
            or "/" in name
            or name.strip() != name
        ):
            raise DeviceConfigError(
                f"network interface {self.iface_id}: '{name}' is not a valid tap name "
                "(1 to 15 characters)"
            )
        if self.guest_mac is not None:
            if not MAC_PATTERN.match(self.guest_mac):
                raise DeviceConfigError(
                    f"network interface {self.iface_id}: '{self.guest_mac}' is not a MAC "
                    "address like 06:00:ac:10:00:02"
                )
            if int(self.guest_mac[:2], 16) & 1:
                raise DeviceConfigError(
                    f"network interface {self.iface_id}: {self.guest_mac} is a multicast address"
                )


@dataclass(frozen=True)
class VsockConfig:
    """Firecracker's hybrid vsock: the guest's CID and the host's Unix socket."""

    guest_cid: int
    uds_path: str
    vsock_id: str | None = None

    def validate(self) -> None:
        if not MIN_GUEST_CID <= self.guest_cid <= MAX_GUEST_CID:
            raise DeviceConfigError(
                f"vsock guest_cid must be {MIN_GUEST_CID} to {MAX_GUEST_CID}, not {self.guest_cid}"
            )
        _check_path(self.uds_path, "vsock: uds_path")
        if len(os.fsencode(self.uds_path)) > 100:  # sun_path holds 108 bytes, "_PORT" suffixes too
            raise DeviceConfigError(f"vsock uds_path {self.uds_path} is longer than 100 bytes")


@dataclass(frozen=True)
class EntropyConfig:
    """Firecracker's ``entropy`` device (virtio-rng): no settings but a rate limiter,
    which dksm does not implement."""


def _check_path(path: str, what: str) -> None:
    try:
        check_path(path, what)
    except HostFileError as exc:
        raise DeviceConfigError(str(exc)) from None


def _check_id(value: str, what: str) -> None:
    if not ID_PATTERN.match(value):
        raise DeviceConfigError(
            f"{what} id '{value}' must be 1 to 64 letters, digits or underscores"
        )


# -- from Firecracker's bodies ------------------------------------------------------------
# The bodies are checked against the schema, and what dksm cannot do in them refused
# (:func:`dksm.vmm.schema.unsupported`), before they get here.


def drive_config(body: Drive) -> DriveConfig:
    assert body.path_on_host is not None  # refused before: no vhost-user drives
    return DriveConfig(
        drive_id=body.drive_id,
        path_on_host=body.path_on_host,
        is_root_device=body.is_root_device,
        is_read_only=bool(body.is_read_only),
        partuuid=body.partuuid,
        cache_type=body.cache_type,
    )


def network_interface_config(body: NetworkInterface) -> NetworkInterfaceConfig:
    return NetworkInterfaceConfig(
        iface_id=body.iface_id, host_dev_name=body.host_dev_name, guest_mac=body.guest_mac
    )


def vsock_config(body: Vsock) -> VsockConfig:
    return VsockConfig(guest_cid=body.guest_cid, uds_path=body.uds_path, vsock_id=body.vsock_id)
