"""Attaching a VM's virtio devices the way Firecracker's MMIO device manager does.

Each device gets the next 4 KiB window of the MMIO gap and the next interrupt line
from 5 up, in Firecracker's order (drives with the root drive first, network
interfaces, vsock, entropy), and is announced to the guest on its command line as
``virtio_mmio.device=4K@0xd0000000:5``; a root drive adds ``root=/dev/vda`` (or
``root=PARTUUID=...``) and ``ro`` or ``rw``.

Two steps, so the builder can keep its order.  :func:`open_backends` opens every
host resource (drive files, taps, the vsock socket) before KVM is touched: a
missing file or a tap that is down is a configuration error that costs nothing,
and nothing is opened after the VM starts (which a seccomp filter may then
forbid).  :func:`attach` creates the devices, one eventfd per queue registered as
an ioeventfd on the queue-notify register (the value written selects the queue)
and one eventfd per device registered as an irqfd, and puts the register windows
on the MMIO bus.

The device modules (and what they import: sockets, logging) are imported by the
functions that make devices, so that a VM without any, the common ``dksm run``,
does not pay for them at start.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from dksm.arch import layout
from dksm.error import DksmError
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.devices.bus import MmioBus
    from dksm.devices.virtio.block import BackingFile
    from dksm.devices.virtio.device import DeviceWorker, VirtioDevice
    from dksm.devices.virtio.transport import MmioTransport
    from dksm.devices.virtio.vsock import VsockListener
    from dksm.kvm.system import Vm
    from dksm.vmm.config import VmConfig
    from dksm.vmm.device_config import DriveConfig, NetworkInterfaceConfig


class DeviceAttachError(DksmError):
    """A device's host side (its eventfds, its worker's epoll set) cannot be made."""


class MmioSlot(Value):
    """Where a device lives: its register window and interrupt line."""

    __slots__ = ("address", "irq")

    def __init__(
        self,
        address: int,
        irq: int,
    ) -> None:
        self.address = address
        self.irq = irq

    @property
    def cmdline(self) -> str:
        return (
            f"virtio_mmio.device={layout.VIRTIO_MMIO_SIZE // 1024}K@{self.address:#010x}:{self.irq}"
        )


def slot(index: int) -> MmioSlot:
    return MmioSlot(
        layout.VIRTIO_MMIO_BASE + index * layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQ_BASE + index
    )


def ordered_drives(config: VmConfig) -> list[DriveConfig]:
    """The root drive first (it becomes /dev/vda), then the others as given."""
    return sorted(config.drives, key=lambda d: not d.is_root_device)


def cmdline_additions(config: VmConfig) -> str:
    """What the devices add to the guest's command line, leading space included."""
    words = []
    root = next((d for d in config.drives if d.is_root_device), None)
    if root is not None:
        words.append(f"root=PARTUUID={root.partuuid}" if root.partuuid else "root=/dev/vda")
        words.append("ro" if root.is_read_only else "rw")
    words += [slot(i).cmdline for i in range(config.virtio_device_count)]
    return "".join(f" {w}" for w in words)


def device_kinds(config: VmConfig) -> set[str]:
    """The kinds of virtio device ``config`` has (what their threads' seccomp rules
    are keyed by)."""
    kinds = set()
    if config.drives:
        kinds.add("block")
    if config.network_interfaces:
        kinds.add("net")
    if config.vsock is not None:
        kinds.add("vsock")
    if config.entropy is not None:
        kinds.add("entropy")
    return kinds


def import_device_modules() -> None:
    """Import now what making devices imports (for a fleet supervisor, before it
    forks: its workers then share the modules instead of each importing them)."""
    import importlib

    for name in ("tap", "virtio.block", "virtio.device", "virtio.entropy", "virtio.net",
                 "virtio.transport", "virtio.vsock"):  # fmt: skip
        importlib.import_module(f"dksm.devices.{name}")
    importlib.import_module("dksm.vmm.socket_cleanup")


class Backends:
    """The host side of every device, opened before the VM exists."""

    __slots__ = ("drives", "taps", "vsock")

    def __init__(self) -> None:
        self.drives: list[tuple[DriveConfig, BackingFile]] = []
        self.taps: list[tuple[NetworkInterfaceConfig, int]] = []
        self.vsock: VsockListener | None = None

    def close(self) -> None:
        for _, backing in self.drives:
            backing.close()
        for _, fd in self.taps:
            os.close(fd)
        if self.vsock is not None:
            self.vsock.close()
        self.release()

    def release(self) -> None:
        """Forget everything: the devices own it now."""
        self.drives.clear()
        self.taps.clear()
        self.vsock = None


def open_backends(config: VmConfig) -> Backends:
    backends = Backends()
    if not config.virtio_device_count:
        return backends
    from dksm.devices.tap import open_tap
    from dksm.devices.virtio.block import open_backing_file
    from dksm.devices.virtio.vsock import VsockListener
    from dksm.vmm import socket_cleanup

    try:
        for drive in ordered_drives(config):
            backends.drives.append(
                (drive, open_backing_file(drive.path_on_host, drive.is_read_only))
            )
        for interface in config.network_interfaces:
            backends.taps.append((interface, open_tap(interface.host_dev_name)))
        if config.vsock is not None:
            backends.vsock = VsockListener(config.vsock.uds_path)
            # A confined VMM cannot remove it at the end: its guardian will.
            socket_cleanup.report(backends.vsock.path, backends.vsock.inode)
    except BaseException:
        backends.close()
        raise
    return backends


def check_backends(config: VmConfig) -> None:
    """What :func:`open_backends` would refuse, found without keeping anything open
    (for a launcher that checks once before many VMs are built elsewhere)."""
    from dksm.devices.tap import check_tap
    from dksm.devices.virtio.block import open_backing_file
    from dksm.devices.virtio.vsock import VsockListener

    for drive in config.drives:
        open_backing_file(drive.path_on_host, drive.is_read_only).close()
    for interface in config.network_interfaces:
        check_tap(interface.host_dev_name)
    if config.vsock is not None and os.path.lexists(config.vsock.uds_path):
        VsockListener(config.vsock.uds_path)  # raises the error a build would


def exclusive_resources(config: VmConfig) -> list[str]:
    """Host resources only one VM may use at a time: read-write drive files, taps,
    vsock sockets (by name, for a fleet to count)."""
    found = [
        f"read-write drive {os.path.realpath(d.path_on_host)}"
        for d in config.drives
        if not d.is_read_only
    ]
    found += [f"tap {n.host_dev_name}" for n in config.network_interfaces]
    if config.vsock is not None:
        found.append(f"vsock socket {os.path.abspath(config.vsock.uds_path)}")
    return found


class AttachedDevice:
    """One device on the bus: the device, its transport, eventfds and worker thread."""

    def __init__(self, device: VirtioDevice, where: MmioSlot) -> None:
        self.device = device
        self.slot = where
        self.queue_events: list[int] = []
        self.interrupt_event = -1
        self.worker: DeviceWorker | None = None
        self.transport: MmioTransport | None = None

    def start(self) -> None:
        if self.worker is not None:
            self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def close(self) -> None:
        """Stop the worker and release everything (after the vCPUs are out)."""
        if self.worker is not None:
            self.worker.stop()
        self.device.close()
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        for fd in [*self.queue_events, self.interrupt_event]:
            if fd >= 0:
                os.close(fd)
        self.queue_events = []
        self.interrupt_event = -1


def _devices(config: VmConfig, ram: memoryview, backends: Backends) -> Iterator[VirtioDevice]:
    from dksm.devices.virtio.block import Block
    from dksm.devices.virtio.entropy import Entropy
    from dksm.devices.virtio.net import Net, parse_mac
    from dksm.devices.virtio.vsock import Vsock

    for drive, backing in backends.drives:
        yield Block(drive.drive_id, ram, backing, flush=drive.cache_type == "Writeback")
    for interface, fd in backends.taps:
        mac = parse_mac(interface.guest_mac) if interface.guest_mac else None
        yield Net(interface.iface_id, ram, fd, mac)
    if config.vsock is not None and backends.vsock is not None:
        vsock = config.vsock
        yield Vsock(vsock.vsock_id or "vsock", ram, vsock.guest_cid, vsock.uds_path, backends.vsock)
    if config.entropy is not None:
        yield Entropy("entropy", ram)


def attach(
    config: VmConfig, vm: Vm, ram: memoryview, bus: MmioBus, backends: Backends
) -> list[AttachedDevice]:
    """Create the devices over ``backends`` (which they own from here), register
    their eventfds with KVM and their windows on ``bus``."""
    if not config.virtio_device_count:
        return []
    attached: list[AttachedDevice] = []
    devices = list(_devices(config, ram, backends))
    backends.release()  # owned by the devices now
    try:
        for index, device in enumerate(devices):
            where = slot(index)
            item = AttachedDevice(device, where)
            attached.append(item)
            try:
                _wire(item, vm, bus)
            except OSError as exc:  # eventfd, epoll: out of descriptors, say
                raise DeviceAttachError(
                    f"cannot attach {device.label}: {exc.strerror or exc}"
                ) from exc
    except BaseException:
        for item in attached:
            with contextlib.suppress(OSError):
                item.close()
        for device in devices[len(attached) :]:
            device.close()
        raise
    return attached


def _wire(item: AttachedDevice, vm: Vm, bus: MmioBus) -> None:
    """Give ``item``'s device its eventfds (each registered with KVM as soon as it is
    held by ``item``, which closes them), its worker and its bus window."""
    from dksm.devices.virtio.device import DeviceWorker, Interrupt
    from dksm.devices.virtio.transport import QUEUE_NOTIFY, MmioTransport

    device, where = item.device, item.slot
    for queue in range(len(device.queues)):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        item.queue_events.append(fd)
        vm.register_ioeventfd(fd, where.address + QUEUE_NOTIFY, 4, queue)
    item.interrupt_event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    vm.register_irqfd(item.interrupt_event, where.irq)
    device.interrupt = Interrupt(item.interrupt_event)
    item.worker = DeviceWorker(device)
    for queue, fd in enumerate(item.queue_events):
        item.worker.watch(fd, _queue_handler(device, fd, queue))
    item.transport = MmioTransport(device, item.queue_events)
    bus.register(where.address, layout.VIRTIO_MMIO_SIZE, item.transport)


def _queue_handler(device: VirtioDevice, fd: int, index: int) -> Callable[[int], None]:
    def notified(events: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        device.notified(index)

    return notified
