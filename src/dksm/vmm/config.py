"""What a microVM is made of, from command-line flags or a Firecracker config file.

:class:`VmConfig` is the one value the builder consumes.  ``from_firecracker_json``
reads Firecracker's ``--config-file`` format (the schema is :mod:`dksm.vmm.schema`,
shared with the API socket) so existing configs carry over unchanged, virtio devices
included (drives, network interfaces, vsock, entropy: :mod:`dksm.vmm.device_config`);
what dksm cannot do (a balloon, MMDS, rate limiters...) is refused by name, one line
per feature, rather than ignored.  Reading the file is :func:`read_config_file` alone.

A config file, like an API body, is untrusted input: its size, nesting depth and
integer lengths are bounded before :mod:`json` sees it (:func:`parse_json`), so that
every malformed one ends in a :class:`ConfigError`, never in a recursion or a
conversion error.
"""

from __future__ import annotations

from dksm.arch import layout
from dksm.error import DksmError, one_line
from dksm.loader.host_file import HostFileError, check_path, read_regular_file
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    # Imported where a config has devices: a VM without them (most starts) does
    # not pay for their classes and patterns.
    from typing import Any

    from dksm.vmm.device_config import (
        DriveConfig,
        EntropyConfig,
        NetworkInterfaceConfig,
        VsockConfig,
    )
    from dksm.vmm.schema import VmConfigDocument

DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
DEFAULT_MEM_MIB = 128  # Firecracker's default machine-config
MAX_VCPUS = 32  # Firecracker's limit, and what the MP table below 640 KiB holds


class ConfigError(DksmError):
    """The VM configuration is invalid; the message names the field."""


class VmConfig(Value):
    """Everything the builder needs to make one VM; :meth:`validate` checks it."""

    __slots__ = (
        "boot_args",
        "drives",
        "entropy",
        "initrd_path",
        "kernel_path",
        "mem_mib",
        "network_interfaces",
        "tsc_frequency_leaf",
        "vcpu_count",
        "vsock",
    )

    def __init__(
        self,
        kernel_path: str,
        boot_args: str = DEFAULT_BOOT_ARGS,
        mem_mib: int = DEFAULT_MEM_MIB,
        vcpu_count: int = 1,
        initrd_path: str | None = None,
        # Announce the TSC frequency in CPUID 0x40000010 (guests then skip calibration).
        tsc_frequency_leaf: bool = True,
        # virtio devices, attached in Firecracker's order: drives (the root one first),
        # network interfaces, vsock, entropy.
        drives: tuple[DriveConfig, ...] = (),
        network_interfaces: tuple[NetworkInterfaceConfig, ...] = (),
        vsock: VsockConfig | None = None,
        entropy: EntropyConfig | None = None,
    ) -> None:
        self.kernel_path = kernel_path
        self.boot_args = boot_args
        self.mem_mib = mem_mib
        self.vcpu_count = vcpu_count
        self.initrd_path = initrd_path
        self.tsc_frequency_leaf = tsc_frequency_leaf
        self.drives = drives
        self.network_interfaces = network_interfaces
        self.vsock = vsock
        self.entropy = entropy

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
        """Raise :class:`ConfigError` (machine) or :class:`DeviceConfigError` (a
        device, named in the message) for the first problem found."""
        self.validate_machine()
        self.validate_devices()

    def validate_machine(self) -> None:
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

    def validate_devices(self) -> None:
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
        from dataclasses import asdict  # the device configs'

        doc = self.fields()
        doc["drives"] = [asdict(drive) for drive in self.drives]
        doc["network_interfaces"] = [asdict(n) for n in self.network_interfaces]
        doc["vsock"] = None if self.vsock is None else asdict(self.vsock)
        doc["entropy"] = None if self.entropy is None else asdict(self.entropy)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> VmConfig:
        from dksm.vmm.device_config import (
            DriveConfig,
            EntropyConfig,
            NetworkInterfaceConfig,
            VsockConfig,
        )

        known = set(cls.__slots__)
        values = {k: v for k, v in doc.items() if k in known}
        values["drives"] = tuple(DriveConfig(**d) for d in doc.get("drives", ()))
        values["network_interfaces"] = tuple(
            NetworkInterfaceConfig(**n) for n in doc.get("network_interfaces", ())
        )
        vsock = doc.get("vsock")
        values["vsock"] = VsockConfig(**vsock) if vsock is not None else None
        values["entropy"] = EntropyConfig() if doc.get("entropy") is not None else None
        return cls(**values)


class ConfigProblemsError(ConfigError):
    """A config document with one or more problems, each on a line of its own."""

    def __init__(self, where: str, lines: list[str]) -> None:
        self.problems = [one_line(f"{where}: {line}") for line in lines]
        super().__init__("\n".join(self.problems))

    def lines(self) -> list[str]:
        return list(self.problems)


MAX_CONFIG_FILE_SIZE = 1 << 20  # Firecracker configs are a few hundred bytes
MAX_JSON_DEPTH = 64  # Firecracker's bodies nest 3 deep
MAX_INTEGER_DIGITS = 20  # every u64 fits; Python's int() refuses past 4300 digits

# One JSON token at a time: whole strings (so that brackets in them do not count),
# brackets, and integer literals too long to convert.  Up to its first syntax error
# json's scanner sees the same strings, so the depth counted here bounds the depth
# it recurses to.  An unterminated string ends the scan (json reports it); the
# look-behind and the possessive run keep a long run of digits linear.
_TOKENS = (
    r'(?P<string>"(?:[^"\\]|\\.)*+")|(?P<unterminated>")|(?P<open>[\[{])|(?P<close>[\]}])'
    rf"|(?P<long>(?<![\d.eE+-])-?\d{{{MAX_INTEGER_DIGITS + 1},}}+(?![.eE]))"
)


def read_config_file(path: str) -> Any:
    """The JSON document in ``path`` (any JSON value; the schema judges its shape):
    a regular file within the size limit, UTF-8 text, bounded JSON."""
    try:
        raw = read_regular_file(
            path, "config file", MAX_CONFIG_FILE_SIZE, f"the {MAX_CONFIG_FILE_SIZE >> 20} MiB limit"
        )
    except HostFileError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from exc
    return parse_json(text, f"config file {path}")


def _check_shape(text: str, where: str) -> None:
    """Refuse what :func:`json.loads` cannot take safely: nesting deep enough to
    exhaust the recursion limit, and integers too long to convert."""
    import re  # already imported by argparse; compiled only when a config is read

    depth = 0
    for token in re.finditer(_TOKENS, text, re.DOTALL):
        kind = token.lastgroup
        if kind == "open":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ConfigError(
                    f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels, "
                    f"line {_line(text, token.start())})"
                )
        elif kind == "close":
            depth -= 1
        elif kind == "long":
            raise ConfigError(
                f"{where}: a number of {len(token.group().lstrip('-'))} digits at line "
                f"{_line(text, token.start())}; at most {MAX_INTEGER_DIGITS} are allowed"
            )
        elif kind == "unterminated":
            return


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _refuse_constant(name: str) -> Any:
    raise _ConstantError(name)


class _ConstantError(ValueError):
    pass


class _DuplicateKeyError(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return doc


def parse_json(text: str, where: str) -> Any:
    """Parse a JSON document as Firecracker does: a key given twice is an error, and
    so is nesting too deep to be a configuration."""
    import json  # only config files and API bodies need it

    _check_shape(text, where)
    try:
        return json.loads(
            text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant
        )
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{where}: the field '{exc}' is given twice") from None
    except _ConstantError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc} is not JSON") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested too deeply") from None


class ConfigFile(Value):
    """A validated Firecracker config file, as dksm will run it."""

    __slots__ = ("dedup", "document", "domain", "pool_root", "serial_out_path", "vm")

    def __init__(
        self,
        vm: VmConfig,
        document: VmConfigDocument,
        # From the "dksm" object, or None where the file leaves it to flags and defaults.
        dedup: str | None = None,
        domain: str | None = None,
        pool_root: str | None = None,
        serial_out_path: str | None = None,
    ) -> None:
        self.vm = vm
        self.document = document
        self.dedup = dedup
        self.domain = domain
        self.pool_root = pool_root
        self.serial_out_path = serial_out_path


# What only the Firecracker front door (dksm vmm / dksm-firecracker) does with a
# config file; `dksm run` and `fleet up` refuse these sections by name.
FRONT_DOOR_SECTIONS = {
    "logger": "the log file is written by 'dksm vmm' (dksm-firecracker) only",
    "metrics": "the metrics file is written by 'dksm vmm' (dksm-firecracker) only",
}
# A fleet's VMs each write their console to the fleet's log of that VM.
FLEET_REFUSED_SECTIONS = {
    **FRONT_DOOR_SECTIONS,
    "serial": "a fleet VM's console goes to its fleet log ('dksm fleet logs')",
}


def validate_document(doc: Any, where: str) -> VmConfigDocument:
    """The document checked against the schema: every problem reported at once."""
    from pydantic import ValidationError

    from dksm.vmm.schema import UNSUPPORTED_SECTIONS, VmConfigDocument, problems

    try:
        return VmConfigDocument.model_validate(doc)
    except ValidationError as exc:
        lines = problems(exc)
        if isinstance(doc, dict):  # what the rest asks for is refused in the same breath
            lines += [
                f"{name}: {reason}"
                for name, reason in UNSUPPORTED_SECTIONS.items()
                if doc.get(name) not in (None, [])
            ]
        raise ConfigProblemsError(where, lines) from None


def vm_config(document: VmConfigDocument) -> VmConfig:
    """The builder's value for a validated (and accepted) document."""
    from dksm.guests import resolve_image_path
    from dksm.vmm.device_config import (
        EntropyConfig,
        drive_config,
        network_interface_config,
        vsock_config,
    )

    boot = document.boot_source
    machine = document.machine_config
    settings = document.dksm
    for field, value in (
        ("kernel_image_path", boot.kernel_image_path),
        ("initrd_path", boot.initrd_path),
    ):
        if value is not None:
            try:
                check_path(value, f"boot-source.{field}")
            except HostFileError as exc:
                raise ConfigError(str(exc)) from None
    return VmConfig(
        kernel_path=resolve_image_path(boot.kernel_image_path),
        boot_args=DEFAULT_BOOT_ARGS if boot.boot_args is None else boot.boot_args,
        mem_mib=DEFAULT_MEM_MIB if machine is None else machine.mem_size_mib,
        vcpu_count=1 if machine is None else machine.vcpu_count,
        initrd_path=boot.initrd_path,
        tsc_frequency_leaf=True if settings is None else settings.tsc_leaf,
        drives=tuple(drive_config(d) for d in document.drives),
        network_interfaces=tuple(network_interface_config(n) for n in document.network_interfaces),
        vsock=None if document.vsock is None else vsock_config(document.vsock),
        entropy=None if document.entropy is None else EntropyConfig(),
    )


def accept_document(doc: Any, where: str, *, refuse: dict[str, str] | None = None) -> ConfigFile:
    """Validate ``doc``, refuse what dksm cannot do (one line per feature, plus the
    sections in ``refuse``), and turn the rest into a :class:`ConfigFile`."""
    from dksm.vmm.device_config import DeviceConfigError
    from dksm.vmm.schema import unsupported

    document = validate_document(doc, where)
    refused = unsupported(document)
    dumped = document.model_dump(by_alias=True)
    refused += [
        f"{section}: {reason}"
        for section, reason in (refuse or {}).items()
        if dumped.get(section) not in (None, [])
    ]
    if refused:
        raise ConfigProblemsError(where, refused)
    config = vm_config(document)
    try:
        config.validate_machine()
    except ConfigError as exc:
        raise ConfigProblemsError(where, [f"machine-config: {exc}"]) from None
    try:
        config.validate_devices()
    except (ConfigError, DeviceConfigError) as exc:
        raise ConfigProblemsError(where, [str(exc)]) from None
    settings = document.dksm
    return ConfigFile(
        vm=config,
        document=document,
        dedup=None if settings is None else settings.dedup,
        domain=None if settings is None else settings.domain,
        pool_root=None if settings is None else settings.pool_root,
        serial_out_path=None if document.serial is None else document.serial.serial_out_path,
    )


def from_firecracker_json(path: str, *, refuse: dict[str, str] | None = None) -> ConfigFile:
    """A Firecracker config file, validated, with what dksm cannot do refused.

    ``refuse``: further sections this caller cannot honour, and why."""
    return accept_document(read_config_file(path), f"config file {path}", refuse=refuse)
