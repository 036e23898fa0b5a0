"""The virtio devices of a VM config: drives, network interfaces, vsock, entropy.

Plain frozen dataclasses that any front end fills (flags, Firecracker's config
file, its API), with Firecracker's field names so its bodies map one to one; and
the readers for those sections of a Firecracker config file, where every field is
checked and unknown ones are errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dksm.error import DksmError

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
        if not self.path_on_host:
            raise DeviceConfigError(f"drive {self.drive_id}: path_on_host is empty")
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
        if not name or len(name.encode()) > 15 or "/" in name or name.strip() != name:
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
        if not self.uds_path:
            raise DeviceConfigError("vsock uds_path is empty")
        if len(self.uds_path.encode()) > 100:  # sun_path holds 108 bytes, "_PORT" suffixes too
            raise DeviceConfigError(f"vsock uds_path {self.uds_path} is longer than 100 bytes")


@dataclass(frozen=True)
class EntropyConfig:
    """Firecracker's ``entropy`` device (virtio-rng): no settings but a rate limiter,
    which dksm does not implement."""


def _check_id(value: str, what: str) -> None:
    if not ID_PATTERN.match(value):
        raise DeviceConfigError(
            f"{what} id '{value}' must be 1 to 64 letters, digits or underscores"
        )


# -- Firecracker config file sections ----------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DeviceConfigError(f"config file: {where} must be an object")
    return value


def _take(
    section: dict[str, Any], name: str, where: str, kind: type, *, required: bool = False
) -> Any:
    if name not in section or section[name] is None:
        if required:
            raise DeviceConfigError(f"config file: {where} lacks the required field '{name}'")
        return None
    value = section[name]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise DeviceConfigError(
            f"config file: {where}.{name} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def _no_unknown(section: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise DeviceConfigError(f"config file: {where} has unknown field '{unknown[0]}'")


def _no_rate_limiter(section: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    for name in names:
        if section.get(name) is not None:
            raise DeviceConfigError(f"config file: {where}.{name}: rate limiters are not supported")


def drives_from_json(value: Any) -> tuple[DriveConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DeviceConfigError("config file: drives must be a list")
    drives = []
    for i, item in enumerate(value):
        where = f"drives[{i}]"
        entry = _object(item, where)
        _no_unknown(
            entry,
            {
                "drive_id",
                "path_on_host",
                "is_root_device",
                "is_read_only",
                "partuuid",
                "cache_type",
                "rate_limiter",
                "io_engine",
                "socket",
            },
            where,
        )
        if entry.get("socket") is not None:
            raise DeviceConfigError(f"config file: {where}: vhost-user drives are not supported")
        _no_rate_limiter(entry, ("rate_limiter",), where)
        engine = _take(entry, "io_engine", where, str)
        if engine is not None and engine not in IO_ENGINES:
            raise DeviceConfigError(
                f"config file: {where}.io_engine must be one of {', '.join(IO_ENGINES)}"
            )
        drive = DriveConfig(
            drive_id=_take(entry, "drive_id", where, str, required=True),
            path_on_host=_take(entry, "path_on_host", where, str, required=True),
            is_root_device=_take(entry, "is_root_device", where, bool, required=True),
            is_read_only=bool(_take(entry, "is_read_only", where, bool)),
            partuuid=_take(entry, "partuuid", where, str),
            cache_type=_take(entry, "cache_type", where, str) or "Unsafe",
        )
        drive.validate()
        drives.append(drive)
    return tuple(drives)


def network_interfaces_from_json(value: Any) -> tuple[NetworkInterfaceConfig, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DeviceConfigError("config file: network-interfaces must be a list")
    interfaces = []
    for i, item in enumerate(value):
        where = f"network-interfaces[{i}]"
        entry = _object(item, where)
        _no_unknown(
            entry,
            {"iface_id", "host_dev_name", "guest_mac", "rx_rate_limiter", "tx_rate_limiter"},
            where,
        )
        _no_rate_limiter(entry, ("rx_rate_limiter", "tx_rate_limiter"), where)
        interface = NetworkInterfaceConfig(
            iface_id=_take(entry, "iface_id", where, str, required=True),
            host_dev_name=_take(entry, "host_dev_name", where, str, required=True),
            guest_mac=_take(entry, "guest_mac", where, str),
        )
        interface.validate()
        interfaces.append(interface)
    return tuple(interfaces)


def vsock_from_json(value: Any) -> VsockConfig | None:
    if value is None:
        return None
    entry = _object(value, "vsock")
    _no_unknown(entry, {"vsock_id", "guest_cid", "uds_path"}, "vsock")
    vsock = VsockConfig(
        guest_cid=_take(entry, "guest_cid", "vsock", int, required=True),
        uds_path=_take(entry, "uds_path", "vsock", str, required=True),
        vsock_id=_take(entry, "vsock_id", "vsock", str),
    )
    vsock.validate()
    return vsock


def entropy_from_json(value: Any) -> EntropyConfig | None:
    if value is None:
        return None
    entry = _object(value, "entropy")
    _no_unknown(entry, {"rate_limiter"}, "entropy")
    _no_rate_limiter(entry, ("rate_limiter",), "entropy")
    return EntropyConfig()
