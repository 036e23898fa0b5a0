"""What the API socket and the config file ask of one microVM, and Firecracker's rules
about when they may ask it.

Before ``InstanceStart`` the controller only collects validated bodies (boot source,
machine configuration, logger, metrics, serial, dksm's settings); ``InstanceStart``
builds the VM from them (an :class:`~dksm.fleet.instance.Instance`, with its pool
lease) and starts its vCPUs.  After that only actions, ``PATCH /vm`` and the GETs are
allowed, as on Firecracker.  Device bodies (drives, network interfaces, vsock,
entropy...) are validated like any other and then refused by name: dksm does not have
those devices yet.

Every method runs on the API thread; the VMM thread (the process's main thread) waits
for :attr:`VmmController.started` and then for the VM to end.
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
from dksm.vmm.schema import (
    UNSUPPORTED_SECTIONS,
    BootSource,
    DksmSettings,
    InstanceActionInfo,
    Logger,
    MachineConfiguration,
    MachineConfigurationUpdate,
    SerialDevice,
    VmConfigDocument,
    VmState,
    logger_refusals,
    machine_refusals,
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
                    self.confinement.apply()  # from here on, no new file and no privilege
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
        config = VmConfig(
            kernel_path=resolve_image_path(boot.kernel_image_path),
            boot_args=DEFAULT_BOOT_ARGS if boot.boot_args is None else boot.boot_args,
            mem_mib=self.machine.mem_size_mib,
            vcpu_count=self.machine.vcpu_count,
            initrd_path=boot.initrd_path,
            tsc_frequency_leaf=self.dksm.tsc_leaf,
        )
        try:
            config.validate()
        except ConfigError as exc:
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
            "drives": [],
            "network-interfaces": [],
            "dksm": self.dksm.document(),
        }
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
