"""What a microVM is made of, from command-line flags or a Firecracker config file.

:class:`VmConfig` is the one value the builder consumes.  ``from_firecracker_json``
reads Firecracker's ``--config-file`` format (the schema is :mod:`dksm.vmm.schema`,
shared with the API socket) so existing configs carry over unchanged; what dksm
cannot do yet (block and network devices, MMDS...) is refused by name, one line per
feature, rather than ignored.  Reading the file is :func:`read_config_file` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dksm.arch import layout
from dksm.error import DksmError

if TYPE_CHECKING:
    from dksm.vmm.schema import VmConfigDocument

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


class ConfigProblemsError(ConfigError):
    """A config document with one or more problems, each on a line of its own."""

    def __init__(self, where: str, lines: list[str]) -> None:
        self.lines = [f"{where}: {line}" for line in lines]
        super().__init__("\n".join(self.lines))


def read_config_file(path: str) -> Any:
    """The JSON document in ``path`` (any JSON value; the schema judges its shape)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not text: {exc.reason}") from exc
    return parse_json(text, f"config file {path}")


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

    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{where}: the field '{exc}' is given twice") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ConfigError(f"{where}: JSON nested too deeply") from None


@dataclass(frozen=True)
class ConfigFile:
    """A validated Firecracker config file, as dksm will run it."""

    vm: VmConfig
    document: VmConfigDocument
    # From the "dksm" object, or None where the file leaves it to flags and defaults.
    dedup: str | None = None
    domain: str | None = None
    pool_root: str | None = None
    serial_out_path: str | None = None


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

    boot = document.boot_source
    machine = document.machine_config
    settings = document.dksm
    return VmConfig(
        kernel_path=resolve_image_path(boot.kernel_image_path),
        boot_args=DEFAULT_BOOT_ARGS if boot.boot_args is None else boot.boot_args,
        mem_mib=DEFAULT_MEM_MIB if machine is None else machine.mem_size_mib,
        vcpu_count=1 if machine is None else machine.vcpu_count,
        initrd_path=boot.initrd_path,
        tsc_frequency_leaf=True if settings is None else settings.tsc_leaf,
    )


def accept_document(doc: Any, where: str, *, refuse: dict[str, str] | None = None) -> ConfigFile:
    """Validate ``doc``, refuse what dksm cannot do (one line per feature, plus the
    sections in ``refuse``), and turn the rest into a :class:`ConfigFile`."""
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
        config.validate()
    except ConfigError as exc:
        raise ConfigProblemsError(where, [f"machine-config: {exc}"]) from None
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
