"""What a microVM is made of, from command-line flags or a Firecracker config file.

:class:`VmConfig` is the one value the builder consumes.  ``from_firecracker_json``
reads Firecracker's ``--config-file`` format so existing configs carry over
unchanged, virtio devices included (``drives``, ``network-interfaces``, ``vsock``,
``entropy``: see :mod:`dksm.vmm.device_config`); what dksm cannot do (a balloon)
is refused by name rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from dksm.arch import layout
from dksm.error import DksmError
from dksm.vmm.device_config import (
    DriveConfig,
    EntropyConfig,
    NetworkInterfaceConfig,
    VsockConfig,
    drives_from_json,
    entropy_from_json,
    network_interfaces_from_json,
    vsock_from_json,
)

DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
DEFAULT_MEM_MIB = 128  # Firecracker's default machine-config
MAX_VCPUS = 32  # Firecracker's limit, and what the MP table below 640 KiB holds


class ConfigError(DksmError):
    """The VM configuration is invalid; the message names the field."""


@dataclass(frozen=True)
class VmConfig:
    kernel_path: str
    boot_args: str = DEFAULT_BOOT_ARGS
    mem_mib: int = DEFAULT_MEM_MIB
    vcpu_count: int = 1
    initrd_path: str | None = None
    # Announce the TSC frequency in CPUID 0x40000010 (guests then skip calibration).
    tsc_frequency_leaf: bool = True
    # virtio devices, attached in Firecracker's order: drives (the root one first),
    # network interfaces, vsock, entropy.
    drives: tuple[DriveConfig, ...] = ()
    network_interfaces: tuple[NetworkInterfaceConfig, ...] = ()
    vsock: VsockConfig | None = None
    entropy: EntropyConfig | None = None

    @property
    def virtio_device_count(self) -> int:
        return (
            len(self.drives)
            + len(self.network_interfaces)
            + (self.vsock is not None)
            + (self.entropy is not None)
        )

    @property
    def mem_size(self) -> int:
        return self.mem_mib * layout.MIB

    def validate(self) -> None:
        if self.mem_size < layout.MIN_MEM_SIZE:
            raise ConfigError(
                f"memory size {self.mem_mib} MiB is too small: at least "
                f"{layout.MIN_MEM_SIZE // layout.MIB} MiB are needed"
            )
        if self.mem_size > layout.MAX_MEM_SIZE:
            raise ConfigError(
                f"memory size {self.mem_mib} MiB is too large: at most "
                f"{layout.MAX_MEM_SIZE // layout.MIB} MiB (RAM must end below the MMIO gap)"
            )
        if not 1 <= self.vcpu_count <= MAX_VCPUS:
            raise ConfigError(f"vcpu_count must be 1 to {MAX_VCPUS}, not {self.vcpu_count}")
        self._validate_devices()

    def _validate_devices(self) -> None:
        for drive in self.drives:
            drive.validate()
        for interface in self.network_interfaces:
            interface.validate()
        if self.vsock is not None:
            self.vsock.validate()
        for what, ids in (
            ("drive", [d.drive_id for d in self.drives]),
            ("network interface", [n.iface_id for n in self.network_interfaces]),
            ("tap", [n.host_dev_name for n in self.network_interfaces]),
            ("MAC address", [n.guest_mac.lower() for n in self.network_interfaces if n.guest_mac]),
        ):
            seen = {i for i in ids if ids.count(i) > 1}
            if seen:
                raise ConfigError(f"{what} '{sorted(seen)[0]}' is given twice")
        roots = [d.drive_id for d in self.drives if d.is_root_device]
        if len(roots) > 1:
            raise ConfigError(f"only one drive may be the root device, not {', '.join(roots)}")
        if self.virtio_device_count > layout.VIRTIO_MAX_DEVICES:
            raise ConfigError(
                f"{self.virtio_device_count} virtio devices are too many: at most "
                f"{layout.VIRTIO_MAX_DEVICES} (one interrupt line each, "
                f"{layout.VIRTIO_IRQ_BASE} to {layout.VIRTIO_IRQ_MAX})"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (for a fleet's spec file); :meth:`from_dict` reverses it."""
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> VmConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["drives"] = tuple(DriveConfig(**d) for d in doc.get("drives", ()))
        values["network_interfaces"] = tuple(
            NetworkInterfaceConfig(**n) for n in doc.get("network_interfaces", ())
        )
        vsock = doc.get("vsock")
        values["vsock"] = VsockConfig(**vsock) if vsock is not None else None
        values["entropy"] = EntropyConfig() if doc.get("entropy") is not None else None
        return cls(**values)


def _field(section: dict[str, Any], name: str, where: str, kind: type) -> Any:
    if name not in section:
        raise ConfigError(f"config file: {where} lacks the required field '{name}'")
    value = section[name]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(
            f"config file: {where}.{name} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


def from_firecracker_json(path: str) -> VmConfig:
    import json  # only config files need it

    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not text: {exc.reason}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path}: the top level must be a JSON object")
    boot = _field(doc, "boot-source", "the config", dict)
    kernel = _field(boot, "kernel_image_path", "boot-source", str)
    boot_args = boot.get("boot_args")
    if boot_args is not None and not isinstance(boot_args, str):
        raise ConfigError("config file: boot-source.boot_args must be a string")
    initrd = boot.get("initrd_path")
    if initrd is not None and not isinstance(initrd, str):
        raise ConfigError("config file: boot-source.initrd_path must be a string or null")
    machine = doc.get("machine-config", {})
    if not isinstance(machine, dict):
        raise ConfigError("config file: machine-config must be an object")
    mem_mib = _field(machine, "mem_size_mib", "machine-config", int) if machine else DEFAULT_MEM_MIB
    vcpus = _field(machine, "vcpu_count", "machine-config", int) if machine else 1
    if doc.get("balloon"):
        raise ConfigError("config file: 'balloon' is not supported (it must be empty)")
    config = VmConfig(
        kernel_path=kernel,
        boot_args=DEFAULT_BOOT_ARGS if boot_args is None else boot_args,
        mem_mib=mem_mib,
        vcpu_count=vcpus,
        initrd_path=initrd,
        drives=drives_from_json(doc.get("drives")),
        network_interfaces=network_interfaces_from_json(doc.get("network-interfaces")),
        vsock=vsock_from_json(doc.get("vsock")),
        entropy=entropy_from_json(doc.get("entropy")),
    )
    config.validate()
    return config
