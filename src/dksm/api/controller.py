"""What the API socket and the config file ask of one microVM, and Firecracker's rules
about when they may ask it.

Before ``InstanceStart`` the controller only collects validated bodies (boot source,
machine configuration, logger, metrics, serial, dksm's settings); ``InstanceStart``
builds the VM from them (an :class:`~dksm.fleet.instance.Instance`, with its pool
lease) and starts its vCPUs.  After that only actions, ``PATCH /vm``, the device
PATCHes Firecracker allows after start and the GETs are allowed, as on Firecracker.
The virtio devices (drives, network interfaces, vsock, entropy) are collected like
the rest, keyed by their ids as Firecracker keys them (a PUT with a known id
replaces that device); a field dksm does not implement (a rate limiter, the Async
I/O engine...) is refused by name, never ignored.  Devices dksm does not have at all
(balloon, pmem...) are validated and then refused by name.

Every method runs on the API thread; the VMM thread (the process's main thread) waits
for :attr:`VmmController.started` and then for the VM to end.

Why one module over 500 lines: Firecracker's API is one state machine.  Each
route's rule for before and after ``InstanceStart`` sits beside what the route does,
as one class over one lock; split by route, the rules about the instance's state
would be repeated or scattered.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, BinaryIO

from dksm.api.logger import VmmLog
from dksm.api.metrics import Counters, Metrics
from dksm.error import DksmError
from dksm.memory.host_mapping import PAGE_SIZE
from dksm.vmm.config import DEFAULT_BOOT_ARGS, DEFAULT_MEM_MIB, ConfigError, VmConfig
from dksm.vmm.console_output import ConsoleOutput, open_console_output
from dksm.vmm.device_config import (
    DeviceConfigError,
    EntropyConfig,
    drive_config,
    network_interface_config,
    vsock_config,
)
from dksm.vmm.schema import (
    UNSUPPORTED_SECTIONS,
    BootSource,
    DksmSettings,
    Drive,
    EntropyDevice,
    InstanceActionInfo,
    Logger,
    MachineConfiguration,
    MachineConfigurationUpdate,
    NetworkInterface,
    PartialDrive,
    PartialNetworkInterface,
    SerialDevice,
    VmConfigDocument,
    VmState,
    Vsock,
    drive_refusals,
    entropy_refusals,
    logger_refusals,
    machine_refusals,
    network_refusals,
    partial_drive_refusals,
    serial_refusals,
)
from dksm.vmm.schema import (
    Metrics as MetricsBody,
)

if TYPE_CHECKING:
    from dksm.fleet.instance import Instance
    from dksm.vmm.confinement import Confinement
    from dksm.vmm.console_input import ConsoleInput

NOT_STARTED = "Not started"
RUNNING = "Running"
PAUSED = "Paused"

APP_NAME = "dksm"
# Exits that end a VM as a failure (Firecracker's vcpu.failures).
VCPU_FAILURES = ("SHUTDOWN", "INTERNAL_ERROR", "FAIL_ENTRY")
NOT_AFTER_START = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_START = "The requested operation is not supported before starting the microVM."


class ApiError(DksmError):
    """A request that cannot be carried out; answered 400 with its message."""


def _refuse(lines: list[str]) -> None:
    if lines:
        raise ApiError("; ".join(lines))


def _version() -> str:
    from dksm import __version__

    return __version__


class _BootTimer:
    """``--boot-timer``: logs the time from InstanceStart to the guest's first console
    line (dksm's measure of booted), then passes bytes through untouched."""

    def __init__(self, sink: BinaryIO, log: VmmLog) -> None:
        self.sink = sink
        self.log = log
        self.started_ns = time.monotonic_ns()
        self.started_cpu_ns = time.process_time_ns()
        self.done = False

    def write(self, data: bytes, /) -> int:
        written = self.sink.write(data)
        if not self.done and b"\n" in data:
            self.done = True
            us = (time.monotonic_ns() - self.started_ns) // 1000
            cpu_us = (time.process_time_ns() - self.started_cpu_ns) // 1000
            self.log.info(
                f"Guest-boot-time = {us:>8} us {us // 1000} ms, "
                f"{cpu_us:>8} CPU us {cpu_us // 1000} CPU ms"
            )
        return written or 0


class VmmController:
    def __init__(
        self,
        instance_id: str,
        log: VmmLog,
        metrics: Metrics,
        *,
        boot_timer: bool = False,
        console_input_fd: int | None = None,
        confinement: Confinement | None = None,
    ) -> None:
        """``confinement``: what the process gives up once the VM is built (its API
        thread keeps serving, within the filter's API-server rules)."""
        self.instance_id = instance_id
        self.log = log
        self.metrics = metrics
        self.boot_timer = boot_timer
        self.console_input_fd = console_input_fd
        self.confinement = confinement
        self.state = NOT_STARTED
        self.boot_source: BootSource | None = None
        self.machine = MachineConfiguration(vcpu_count=1, mem_size_mib=DEFAULT_MEM_MIB)
        self.logger_body: Logger | None = None
        self.metrics_body: MetricsBody | None = None
        self.serial = SerialDevice()
        self.dksm = DksmSettings()
        # Devices by id, in the order first PUT (Firecracker's order on the MMIO bus).
        self.drives: dict[str, Drive] = {}
        self.network_interfaces: dict[str, NetworkInterface] = {}
        self.vsock: Vsock | None = None
        self.entropy: EntropyDevice | None = None
        self.instance: Instance | None = None
        self.started = threading.Event()
        self._serial_sink: ConsoleOutput | None = None
        self._console: ConsoleInput | None = None
        self._lock = threading.Lock()
        metrics.sample_vm = self._sample_vm

    # -- pre-boot resources -------------------------------------------------------

    def _pre_boot(self) -> None:
        if self.state != NOT_STARTED:
            raise ApiError(NOT_AFTER_START)

    def put_boot_source(self, body: BootSource) -> None:
        with self._lock:
            self._pre_boot()
            self.boot_source = body

    def put_machine_config(self, body: MachineConfiguration) -> None:
        with self._lock:
            self._pre_boot()
            refused = machine_refusals(body)
            if refused:
                raise ApiError("; ".join(refused))
            self._check_machine(body)
            self.machine = body

    def patch_machine_config(self, body: MachineConfigurationUpdate) -> None:
        changes = {k: v for k, v in body.model_dump().items() if v is not None}
        merged = MachineConfiguration.model_validate({**self.machine.model_dump(), **changes})
        self.put_machine_config(merged)

    @staticmethod
    def _check_machine(body: MachineConfiguration) -> None:
        probe = VmConfig(kernel_path="", mem_mib=body.mem_size_mib, vcpu_count=body.vcpu_count)
        try:
            probe.validate()
        except ConfigError as exc:
            raise ApiError(f"machine-config: {exc}") from None

    def put_logger(self, body: Logger) -> None:
        with self._lock:
            self._pre_boot()
            refused = logger_refusals(body)
            if refused:
                raise ApiError("; ".join(refused))
            self.log.configure(
                path=body.log_path,
                level=body.level,
                show_level=body.show_level,
                show_origin=body.show_log_origin,
            )
            self.logger_body = body

    def put_metrics(self, body: MetricsBody) -> None:
        with self._lock:
            self._pre_boot()
            self.metrics.open(body.metrics_path)
            self.metrics_body = body

    def put_serial(self, body: SerialDevice) -> None:
        with self._lock:
            self._pre_boot()
            refused = serial_refusals(body)
            if refused:
                raise ApiError("; ".join(refused))
            sink = None
            if body.serial_out_path is not None:
                try:
                    sink = open_console_output(body.serial_out_path, append=True)
                except DksmError as exc:
                    raise ApiError(str(exc)) from None
            if self._serial_sink is not None:
                self._serial_sink.close()
            self._serial_sink = sink
            self.serial = body

    def put_dksm(self, body: DksmSettings) -> None:
        with self._lock:
            self._pre_boot()
            if body.pool_root is not None:
                from dksm.dedup.pool import pool_root

                pool_root(body.pool_root)  # a root that cannot be a pool is refused now
            self.dksm = body

    # -- virtio devices -------------------------------------------------------------

    def put_drive(self, body: Drive) -> None:
        with self._lock:
            self._pre_boot()
            _refuse(drive_refusals(body, "drive"))
            drives = {**self.drives, body.drive_id: body}
            self._check_devices(drives=drives)
            self._check_backend(drives=(drive_config(body),))
            self.drives = drives

    def patch_drive(self, body: PartialDrive) -> None:
        with self._lock:
            self._post_boot()
            if body.drive_id not in self.drives:
                raise ApiError(f"drive {body.drive_id} does not exist")
            _refuse(partial_drive_refusals(body, "drive"))
            # Nothing else to change: a body of only drive_id changes nothing.

    def put_network_interface(self, body: NetworkInterface) -> None:
        with self._lock:
            self._pre_boot()
            _refuse(network_refusals(body, "network-interface"))
            interfaces = {**self.network_interfaces, body.iface_id: body}
            self._check_devices(network_interfaces=interfaces)
            self._check_backend(network_interfaces=(network_interface_config(body),))
            self.network_interfaces = interfaces

    def patch_network_interface(self, body: PartialNetworkInterface) -> None:
        with self._lock:
            self._post_boot()
            if body.iface_id not in self.network_interfaces:
                raise ApiError(f"network interface {body.iface_id} does not exist")
            _refuse(network_refusals(body, "network-interface"))

    def put_vsock(self, body: Vsock) -> None:
        with self._lock:
            self._pre_boot()
            self._check_devices(vsock=body)
            self._check_backend(vsock=vsock_config(body))
            self.vsock = body

    def put_entropy(self, body: EntropyDevice) -> None:
        with self._lock:
            self._pre_boot()
            _refuse(entropy_refusals(body))
            self._check_devices(entropy=body)
            self.entropy = body

    def _post_boot(self) -> None:
        if self.state == NOT_STARTED:
            raise ApiError(NOT_BEFORE_START)

    def _device_config(
        self,
        drives: dict[str, Drive] | None = None,
        network_interfaces: dict[str, NetworkInterface] | None = None,
        vsock: Vsock | None = None,
        entropy: EntropyDevice | None = None,
    ) -> VmConfig:
        """A VM config of the devices as they would be with the given ones replaced
        (the machine's own fields are the defaults: only the devices are judged)."""
        drives = self.drives if drives is None else drives
        interfaces = self.network_interfaces if network_interfaces is None else network_interfaces
        vsock = self.vsock if vsock is None else vsock
        entropy = self.entropy if entropy is None else entropy
        return VmConfig(
            kernel_path="",
            drives=tuple(drive_config(d) for d in drives.values()),
            network_interfaces=tuple(network_interface_config(n) for n in interfaces.values()),
            vsock=None if vsock is None else vsock_config(vsock),
            entropy=None if entropy is None else EntropyConfig(),
        )

    def _check_devices(self, **changed: Any) -> None:
        try:
            self._device_config(**changed).validate_devices()
        except (ConfigError, DeviceConfigError) as exc:
            raise ApiError(str(exc)) from None

    @staticmethod
    def _check_backend(**devices: Any) -> None:
        """What building would refuse about the device's host side (a missing drive
        file, a tap that is down, a vsock path in use), said now, as Firecracker
        does when it opens them at the PUT."""
        from dksm.vmm.device_manager import check_backends

        try:
            check_backends(VmConfig(kernel_path="", **devices))
        except DksmError as exc:
            raise ApiError(str(exc)) from None

    def refuse_device(self, section: str) -> None:
        """A well-formed body for a device dksm does not have (yet)."""
        with self._lock:
            self._pre_boot()
            raise ApiError(f"{section}: {UNSUPPORTED_SECTIONS[section]}")

    def apply_document(self, doc: VmConfigDocument) -> None:
        """A whole config file, accepted already (its refusals were reported)."""
        if doc.logger is not None:
            self.put_logger(doc.logger)
        if doc.metrics is not None:
            self.put_metrics(doc.metrics)
        if doc.serial is not None:
            self.put_serial(doc.serial)
        if doc.dksm is not None:
            self.put_dksm(doc.dksm)
        if doc.machine_config is not None:
            self.put_machine_config(doc.machine_config)
        for drive in doc.drives:
            self.put_drive(drive)
        for interface in doc.network_interfaces:
            self.put_network_interface(interface)
        if doc.vsock is not None:
            self.put_vsock(doc.vsock)
        if doc.entropy is not None:
            self.put_entropy(doc.entropy)
        self.put_boot_source(doc.boot_source)

    # -- actions --------------------------------------------------------------------

    def action(self, body: InstanceActionInfo) -> None:
        if body.action_type == "InstanceStart":
            self.start()
        elif body.action_type == "FlushMetrics":
            if not self.metrics.flush():
                raise ApiError("FlushMetrics: the metrics system is not initialized")
        else:  # SendCtrlAltDel
            with self._lock:
                if self.instance is None:
                    raise ApiError(NOT_BEFORE_START)
                keyboard = self.instance.vm.keyboard
                assert keyboard is not None
                keyboard.send_ctrl_alt_del()

    def start(self) -> None:
        from dksm.fleet.instance import DedupMode, Instance, InstanceSpec
        from dksm.vmm.console_input import ConsoleInput

        with self._lock:
            self._pre_boot()
            if self.boot_source is None:
                raise ApiError("Cannot start microvm without kernel configuration.")
            config = self.vm_config()
            pool_root = None
            if self.dksm.pool_root is not None:
                from dksm.dedup.pool import pool_root as checked_pool_root

                pool_root = checked_pool_root(self.dksm.pool_root)
            spec = InstanceSpec(
                config=config,
                dedup=DedupMode(self.dksm.dedup),
                domain=self.dksm.domain,
                pool_root=pool_root,
            )
            output = self._serial_sink or open_console_output(None)
            self._serial_sink = output
            sink: Any = output
            if self.boot_timer:
                sink = _BootTimer(sink, self.log)
            try:
                self.instance = Instance(spec, sink)
            except DksmError as exc:
                raise ApiError(f"Cannot start microvm: {exc}") from None
            vm = self.instance.vm
            output.abandon = lambda: vm.finished  # a stopping VM waits for no reader
            if self.console_input_fd is not None:
                self._console = ConsoleInput(self.console_input_fd, vm.serial)
                self._console.__enter__()  # character mode, while the process may
            if self.confinement is not None:
                try:
                    from dksm.vmm.device_manager import device_kinds

                    # From here on, no new file and no privilege.
                    self.confinement.apply(devices=device_kinds(config))
                except DksmError as exc:
                    self.close()
                    raise ApiError(f"Cannot start microvm: {exc}") from None
            if self._console is not None:
                self._console.start()
            vm.start()
            self.state = RUNNING
            self.log.info(
                f"Started microVM: {config.kernel_path}, {config.vcpu_count} vCPUs, "
                f"{config.mem_mib} MiB, dedup {spec.dedup.value} (domain {spec.domain})"
            )
            self.started.set()

    def vm_config(self) -> VmConfig:
        from dksm.guests import resolve_image_path

        assert self.boot_source is not None
        boot = self.boot_source
        devices = self._device_config()
        config = VmConfig(
            kernel_path=resolve_image_path(boot.kernel_image_path),
            boot_args=DEFAULT_BOOT_ARGS if boot.boot_args is None else boot.boot_args,
            mem_mib=self.machine.mem_size_mib,
            vcpu_count=self.machine.vcpu_count,
            initrd_path=boot.initrd_path,
            tsc_frequency_leaf=self.dksm.tsc_leaf,
            drives=devices.drives,
            network_interfaces=devices.network_interfaces,
            vsock=devices.vsock,
            entropy=devices.entropy,
        )
        try:
            config.validate()
        except (ConfigError, DeviceConfigError) as exc:
            raise ApiError(str(exc)) from None
        return config

    def patch_vm(self, body: VmState) -> None:
        with self._lock:
            if self.instance is None:
                raise ApiError(NOT_BEFORE_START)
            vm = self.instance.vm
            if vm.finished:
                raise ApiError("The microVM has stopped.")
            if body.state == "Paused":
                if not vm.pause():
                    raise ApiError("Failed to pause the vCPUs.")
                self.state = PAUSED
                self.log.info("Paused the microVM")
            else:
                vm.resume()
                self.state = RUNNING
                self.log.info("Resumed the microVM")

    # -- what GETs answer -------------------------------------------------------

    def instance_info(self) -> dict[str, Any]:
        return {
            "id": self.instance_id,
            "state": self.state,
            "vmm_version": _version(),
            "app_name": APP_NAME,
        }

    def version(self) -> dict[str, Any]:
        return {"firecracker_version": _version()}

    def machine_config(self) -> dict[str, Any]:
        return self.machine.document()

    def dksm_settings(self) -> dict[str, Any]:
        doc = self.dksm.document()
        if self.instance is not None:
            doc["pages_shared"] = self.instance.vm.memory.pages_shared
        return doc

    def full_config(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "machine-config": self.machine.document(),
            "drives": [d.document() for d in self.drives.values()],
            "network-interfaces": [n.document() for n in self.network_interfaces.values()],
            "dksm": self.dksm.document(),
        }
        if self.vsock is not None:
            doc["vsock"] = self.vsock.document()
        if self.entropy is not None:
            doc["entropy"] = self.entropy.document()
        if self.boot_source is not None:
            doc["boot-source"] = self.boot_source.document()
        if self.logger_body is not None:
            doc["logger"] = self.logger_body.document()
        if self.metrics_body is not None:
            doc["metrics"] = self.metrics_body.document()
        return doc

    # -- the VM's counters, for the metrics file ---------------------------------

    def _sample_vm(self, counters: Counters) -> dict[str, Any]:
        instance = self.instance
        if instance is None:
            return {}
        vm = instance.vm
        io_in, io_out = vm.io_counts()
        exits = vm.exit_counts()
        for name, total in (
            ("exit_io_in", io_in),
            ("exit_io_out", io_out),
            ("exit_mmio_read", exits.get("MMIO_READ", 0)),
            ("exit_mmio_write", exits.get("MMIO_WRITE", 0)),
            (
                "failures",
                sum(exits.get(n, 0) for n in ("SHUTDOWN", "INTERNAL_ERROR", "FAIL_ENTRY")),
            ),
        ):
            counters.set_total("vcpu", name, total)
        counters.set_total("uart", "write_count", vm.serial.bytes_written)
        counters.set_total("uart", "read_count", vm.serial.bytes_received)
        group: dict[str, Any] = {
            "dedup": instance.spec.dedup.value,
            "domain": instance.spec.domain,
            "pages_shared": vm.memory.pages_shared,
            "bytes_shared": vm.memory.pages_shared * PAGE_SIZE,
        }
        if instance.pool is not None:
            try:
                group["pool"] = instance.pool.stats().to_json()
            except DksmError as exc:
                group["pool_error"] = str(exc)
        return {"dksm": group}

    # -- the end ------------------------------------------------------------------

    def close(self) -> None:
        if self._console is not None:
            self._console.stop()
            self._console = None
        if self.instance is not None:
            self.instance.close()
            self.instance = None
        if self._serial_sink is not None:
            self._serial_sink.close()
            self._serial_sink = None
