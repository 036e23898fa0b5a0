"""What a microVM is made of, from command-line flags or a Firecracker config file.

:class:`VmConfig` is the one value the builder consumes.  ``from_firecracker_json``
reads Firecracker's ``--config-file`` format so existing configs carry over
unchanged; what dksm cannot do yet (block and network devices) is refused by name
rather than ignored.  A config file is untrusted input: its size, nesting depth and
integer lengths are bounded before :mod:`json` sees it, so that every malformed one
ends in a :class:`ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dksm.arch import layout
from dksm.error import DksmError
from dksm.loader.host_file import HostFileError, check_path, read_regular_file

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


def _field(section: dict[str, Any], name: str, where: str, kind: type) -> Any:
    if name not in section:
        raise ConfigError(f"config file: {where} lacks the required field '{name}'")
    value = section[name]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(
            f"config file: {where}.{name} must be {kind.__name__}, not {type(value).__name__}"
        )
    return value


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


def _check_shape(text: str, source: str) -> None:
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
                    f"config file {source} nests deeper than {MAX_JSON_DEPTH} levels "
                    f"(line {_line(text, token.start())})"
                )
        elif kind == "close":
            depth -= 1
        elif kind == "long":
            raise ConfigError(
                f"config file {source}: a number of {len(token.group().lstrip('-'))} digits "
                f"at line {_line(text, token.start())}; at most {MAX_INTEGER_DIGITS} are allowed"
            )
        elif kind == "unterminated":
            return


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _path_field(section: dict[str, Any], name: str, where: str) -> None:
    value = section.get(name)
    if isinstance(value, str):
        try:
            check_path(value, f"{where}.{name}")
        except HostFileError as exc:
            raise ConfigError(f"config file: {exc}") from exc


def from_firecracker_json(path: str) -> VmConfig:
    import json  # only config files need it

    try:
        data = read_regular_file(
            path, "config file", MAX_CONFIG_FILE_SIZE, f"the {MAX_CONFIG_FILE_SIZE >> 20} MiB limit"
        )
    except HostFileError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from exc
    _check_shape(text, path)
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
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
    _path_field(boot, "kernel_image_path", "boot-source")
    _path_field(boot, "initrd_path", "boot-source")
    machine = doc.get("machine-config", {})
    if not isinstance(machine, dict):
        raise ConfigError("config file: machine-config must be an object")
    mem_mib = _field(machine, "mem_size_mib", "machine-config", int) if machine else DEFAULT_MEM_MIB
    vcpus = _field(machine, "vcpu_count", "machine-config", int) if machine else 1
    for section in ("drives", "network-interfaces", "vsock", "balloon"):
        value = doc.get(section)
        if value:
            raise ConfigError(f"config file: '{section}' is not supported yet (it must be empty)")
    config = VmConfig(
        kernel_path=kernel,
        boot_args=DEFAULT_BOOT_ARGS if boot_args is None else boot_args,
        mem_mib=mem_mib,
        vcpu_count=vcpus,
        initrd_path=initrd,
    )
    config.validate()
    return config
