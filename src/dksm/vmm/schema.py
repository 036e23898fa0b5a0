"""Firecracker's configuration bodies, declared once: the config file is these bodies
in one document, and the API socket takes each of them on its own path.

The shapes, names, defaults and limits are those of Firecracker's API description
(its swagger ``firecracker.yaml``): unknown fields are errors, types are strict (a
``"2"`` is not a vCPU count), and every problem of a document is reported at once.
Validation says only whether a body is well formed.  Whether dksm can *do* what a
well-formed body asks is decided where it is used (:func:`unsupported`), so that a
device dksm gains later only needs its line there removed and its builder step added.

dksm's own settings (dedup mode, sharing domain, pool root, the TSC leaf) live in one
extra object, ``"dksm"``, at the top of the config file and at ``/dksm`` on the API:
a Firecracker client never sends it, and unknown fields elsewhere stay errors.

pydantic is imported by this module alone, and this module only by what reads a
config file or serves the API: ``dksm run --kernel`` never loads it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_VCPUS = 32  # Firecracker's range, and what dksm's MP table holds
LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")
DEDUP_MODES = ("none", "ksm", "dksm", "dksm+ksm")


class Body(BaseModel):
    """A Firecracker request body: strict types, no unknown fields, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)

    def document(self) -> dict[str, Any]:
        """The body as Firecracker prints it (GET answers, the exported config)."""
        return self.model_dump(by_alias=True, exclude_none=True)


NonNegative = Annotated[int, Field(ge=0)]


class TokenBucket(Body):
    size: NonNegative
    refill_time: NonNegative
    one_time_burst: NonNegative | None = None


class RateLimiter(Body):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class BootSource(Body):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class MachineConfiguration(Body):
    vcpu_count: Annotated[int, Field(ge=1, le=MAX_VCPUS)]
    mem_size_mib: Annotated[int, Field(ge=1)]
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"] | None = None
    huge_pages: Literal["None", "Transparent", "2M"] = "None"


class MachineConfigurationUpdate(Body):
    """``PATCH /machine-config``: any subset of the fields."""

    vcpu_count: Annotated[int, Field(ge=1, le=MAX_VCPUS)] | None = None
    mem_size_mib: Annotated[int, Field(ge=1)] | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"] | None = None
    huge_pages: Literal["None", "Transparent", "2M"] | None = None


class Drive(Body):
    drive_id: str
    is_root_device: bool
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    is_read_only: bool | None = None
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] = "Sync"
    socket: str | None = None


class PartialDrive(Body):
    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterface(Body):
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: Annotated[int, Field(ge=68, le=65535)] | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class PartialNetworkInterface(Body):
    iface_id: str
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(Body):
    guest_cid: Annotated[int, Field(ge=3)]
    uds_path: str
    vsock_id: str | None = None


class EntropyDevice(Body):
    rate_limiter: RateLimiter | None = None


class Balloon(Body):
    amount_mib: NonNegative
    deflate_on_oom: bool
    stats_polling_interval_s: NonNegative = 0
    free_page_hinting: bool = False
    free_page_reporting: bool = False


class MmdsConfig(Body):
    network_interfaces: list[str]
    version: Literal["V1", "V2"] = "V1"
    ipv4_address: str | None = None
    imds_compat: bool = False


class CpuConfig(Body):
    kvm_capabilities: list[str] | None = None
    cpuid_modifiers: list[dict[str, Any]] | None = None
    msr_modifiers: list[dict[str, Any]] | None = None
    reg_modifiers: list[dict[str, Any]] | None = None
    vcpu_features: list[dict[str, Any]] | None = None


class SerialDevice(Body):
    serial_out_path: str | None = None
    rate_limiter: TokenBucket | None = None


class Pmem(Body):
    id: str
    path_on_host: str
    root_device: bool = False
    read_only: bool = False
    rate_limiter: RateLimiter | None = None


class MemoryHotplugConfig(Body):
    total_size_mib: NonNegative | None = None
    slot_size_mib: Annotated[int, Field(ge=128)] = 128
    block_size_mib: Annotated[int, Field(ge=2)] = 2


class Logger(Body):
    level: str = "Info"
    log_path: str | None = None
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        # Firecracker takes the level names in any case.
        for level in LOG_LEVELS:
            if value.lower() == level.lower():
                return level
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)} (any case)")


class Metrics(Body):
    metrics_path: str


class InstanceActionInfo(Body):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class VmState(Body):
    state: Literal["Paused", "Resumed"]


class DksmSettings(Body):
    """dksm's own settings: how the VM's memory is deduplicated, and where."""

    dedup: Literal["none", "ksm", "dksm", "dksm+ksm"] = "dksm"
    domain: Annotated[str, Field(min_length=1)] = "default"
    pool_root: str | None = None
    tsc_leaf: bool = True


class VmConfigDocument(Body):
    """A whole config file (``--config-file``), also what ``GET /vm/config`` answers."""

    boot_source: BootSource = Field(alias="boot-source")
    machine_config: MachineConfiguration | None = Field(default=None, alias="machine-config")
    drives: list[Drive] = Field(default_factory=list)
    network_interfaces: list[NetworkInterface] = Field(
        default_factory=list, alias="network-interfaces"
    )
    vsock: Vsock | None = None
    entropy: EntropyDevice | None = None
    balloon: Balloon | None = None
    logger: Logger | None = None
    metrics: Metrics | None = None
    mmds_config: MmdsConfig | None = Field(default=None, alias="mmds-config")
    cpu_config: CpuConfig | None = Field(default=None, alias="cpu-config")
    serial: SerialDevice | None = None
    pmem: list[Pmem] = Field(default_factory=list)
    memory_hotplug: MemoryHotplugConfig | None = Field(default=None, alias="memory-hotplug")
    dksm: DksmSettings | None = None


# -- what dksm cannot do (yet) ---------------------------------------------------------

# Sections whose mere presence asks for a device or service dksm does not have, and
# why.  A device that lands removes its line here and adds its builder step.
UNSUPPORTED_SECTIONS = {
    "drives": "block devices (virtio-blk) are not supported yet",
    "network-interfaces": "network devices (virtio-net) are not supported yet",
    "vsock": "vsock devices are not supported yet",
    "entropy": "entropy devices (virtio-rng) are not supported yet",
    "balloon": "balloon devices are not supported",
    "mmds-config": "the microVM metadata service (MMDS) is not supported",
    "cpu-config": "custom CPU templates are not supported",
    "pmem": "pmem devices are not supported",
    "memory-hotplug": "memory hotplug (virtio-mem) is not supported",
}


def machine_refusals(machine: MachineConfiguration, where: str = "machine-config") -> list[str]:
    """One line per machine-config field whose value dksm cannot honour."""
    lines = []
    if machine.smt:
        lines.append(f"{where}.smt: true is not supported (dksm's vCPUs are single-threaded cores)")
    if machine.track_dirty_pages:
        lines.append(f"{where}.track_dirty_pages: true is not supported (no snapshots)")
    if machine.cpu_template not in (None, "None"):
        lines.append(f"{where}.cpu_template: {machine.cpu_template} is not supported")
    if machine.huge_pages != "None":
        lines.append(
            f"{where}.huge_pages: {machine.huge_pages} is not supported (the page pool "
            "shares 4 KiB pages)"
        )
    return lines


def serial_refusals(serial: SerialDevice, where: str = "serial") -> list[str]:
    if serial.rate_limiter is not None:
        return [f"{where}.rate_limiter: rate-limiting the serial console is not supported"]
    return []


def logger_refusals(logger: Logger, where: str = "logger") -> list[str]:
    if logger.module is not None:
        return [f"{where}.module: filtering the log by module is not supported"]
    return []


def unsupported(doc: VmConfigDocument) -> list[str]:
    """One line per feature the document asks for that dksm does not implement."""
    lines = []
    for name, reason in UNSUPPORTED_SECTIONS.items():
        value = getattr(doc, name.replace("-", "_"))
        if value:  # null and [] ask for nothing
            lines.append(f"{name}: {reason}")
    if doc.machine_config is not None:
        lines += machine_refusals(doc.machine_config)
    if doc.serial is not None:
        lines += serial_refusals(doc.serial)
    if doc.logger is not None:
        lines += logger_refusals(doc.logger)
    return lines


# -- problems as lines -------------------------------------------------------------------


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "the document"


def problems(error: ValidationError) -> list[str]:
    """A validation error as one line per problem, each naming where it is."""
    lines = []
    for item in error.errors(include_url=False):
        kind = item["type"]
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "json_invalid":
            message = f"not valid JSON ({item['ctx'].get('error', 'parse error')})"
        elif kind == "model_type":
            message = "must be a JSON object"
        else:
            message = str(item["msg"])
            message = message.removeprefix("Value error, ")
        lines.append(f"{_location(tuple(item['loc']))}: {message}")
    return lines
