"""The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): a device's
registers in a 4 KiB window of the MMIO gap.

The registers are read and written by vCPU threads (MMIO exits), with the device's
lock held.  Queue notifications (``QueueNotify``) do not normally reach this code:
KVM signals the queue's eventfd itself (ioeventfd) and the device's worker thread
wakes up.  A notification KVM did not match (a queue index with no ioeventfd) is
forwarded to the same eventfd here, so both paths end alike.

The status register follows the initialisation sequence of section 3.1.1:
ACKNOWLEDGE, DRIVER, features, FEATURES_OK (refused unless the driver accepted
VERSION_1 and nothing the device did not offer), queues, DRIVER_OK.  The driver may
not clear a bit except by writing 0, which resets the device.  Registers written
out of order are ignored with a line in the log, as Firecracker does.
"""

from __future__ import annotations

import os

from dksm.devices.virtio.device import F_VERSION_1, VirtioDevice

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0  # what Firecracker reports

# Register offsets.
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Device status bits (section 2.1).
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

_QUEUE_ADDRESS = {
    QUEUE_DESC_LOW: ("desc_table", 0),
    QUEUE_DESC_HIGH: ("desc_table", 32),
    QUEUE_DRIVER_LOW: ("avail_ring", 0),
    QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    QUEUE_DEVICE_LOW: ("used_ring", 0),
    QUEUE_DEVICE_HIGH: ("used_ring", 32),
}


class MmioTransport:
    """The register window of one virtio device (a :class:`~dksm.devices.bus.BusDevice`)."""

    def __init__(self, device: VirtioDevice, queue_events: list[int]) -> None:
        self.device = device
        self.queue_events = queue_events  # one eventfd per queue, as KVM signals them
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.config_generation = 0
        self.ignored_accesses = 0
        self.notify_exits = 0  # notifications that came as MMIO exits, not through KVM

    @property
    def offered_features(self) -> int:
        return self.device.offered_features() | F_VERSION_1

    # -- the bus interface ------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self.device.lock:
            if offset >= CONFIG:
                return self._read_config(offset - CONFIG, size)
            if size != 4 or offset % 4:
                return self._ignore(f"{size}-byte read at register {offset:#x}")
            return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.device.lock:
            if offset >= CONFIG:
                if self.status & DRIVER and not self.status & FAILED:
                    self.device.write_config(offset - CONFIG, size, value)
                else:
                    self._ignore("configuration write before DRIVER")
                return
            if size != 4 or offset % 4:
                self._ignore(f"{size}-byte write at register {offset:#x}")
                return
            self._write_register(offset, value)

    # -- registers ----------------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        device = self.device
        queue = device.queues[self.queue_sel] if self.queue_sel < len(device.queues) else None
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return device.device_type
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return (self.offered_features >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_NUM:
            return queue.size if queue is not None else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue is not None else 0
        if offset == INTERRUPT_STATUS:
            return device.interrupt.status if device.interrupt is not None else 0
        if offset == STATUS:
            return self.status | (DEVICE_NEEDS_RESET if device.needs_reset else 0)
        if offset in _QUEUE_ADDRESS:
            if queue is None:
                return 0
            name, shift = _QUEUE_ADDRESS[offset]
            return (int(getattr(queue, name)) >> shift) & 0xFFFF_FFFF
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions: every ID reads as absent
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return self._ignore(f"read of unknown register {offset:#x}")

    def _write_register(self, offset: int, value: int) -> None:
        device = self.device
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & (FEATURES_OK | FAILED) or not self.status & DRIVER:
                self._ignore("driver features written outside DRIVER, before FEATURES_OK")
            elif self.driver_features_sel <= 1:
                shift = 32 * self.driver_features_sel
                mask = 0xFFFF_FFFF << shift
                device.acked_features = (device.acked_features & ~mask) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self._notify(value)
        elif offset == INTERRUPT_ACK:
            if device.interrupt is not None:
                device.interrupt.acknowledge(value)
        elif offset == STATUS:
            self._write_status(value)
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY) or offset in _QUEUE_ADDRESS:
            self._write_queue(offset, value)
        else:
            self._ignore(f"write of {value:#x} to register {offset:#x}")

    def _write_queue(self, offset: int, value: int) -> None:
        if self.queue_sel >= len(self.device.queues):
            self._ignore(
                f"queue register {offset:#x} of queue {self.queue_sel}, which does not exist"
            )
            return
        if not self.status & FEATURES_OK or self.status & (DRIVER_OK | FAILED):
            self._ignore(f"queue register {offset:#x} written outside FEATURES_OK")
            return
        queue = self.device.queues[self.queue_sel]
        if offset == QUEUE_READY:
            queue.ready = value == 1
        elif queue.ready:
            self._ignore(
                f"queue register {offset:#x} written while queue {self.queue_sel} is ready"
            )
        elif offset == QUEUE_NUM:
            queue.size = value & 0xFFFF
        else:
            name, shift = _QUEUE_ADDRESS[offset]
            current = int(getattr(queue, name))
            setattr(queue, name, (current & ~(0xFFFF_FFFF << shift)) | (value << shift))

    def _notify(self, index: int) -> None:
        # KVM matched no ioeventfd (or there is none): deliver it the same way.
        self.notify_exits += 1
        if index < len(self.queue_events):
            os.eventfd_write(self.queue_events[index], 1)
        else:
            self.device.fail(f"the driver notified queue {index}, which does not exist")

    def _write_status(self, value: int) -> None:
        device = self.device
        if value == 0:
            device.reset()
            if device.interrupt is not None:
                device.interrupt.clear()
            self.status = 0
            self.device_features_sel = self.driver_features_sel = self.queue_sel = 0
            return
        value &= ~DEVICE_NEEDS_RESET  # the device's bit, never the driver's
        if self.status & ~value:
            self._ignore(f"status {value:#x} clears bits of {self.status:#x} (only 0 resets)")
            return
        added = value & ~self.status
        if added & FAILED:
            self.status |= FAILED
            device.on_reset()  # the driver gave up: stop serving
            added &= ~FAILED
        for bit, needs in (
            (ACKNOWLEDGE, 0),
            (DRIVER, ACKNOWLEDGE),
            (FEATURES_OK, ACKNOWLEDGE | DRIVER),
            (DRIVER_OK, ACKNOWLEDGE | DRIVER | FEATURES_OK),
        ):
            if not added & bit:
                continue
            if self.status & needs != needs or self.status & FAILED:
                self._ignore(f"status bit {bit:#x} set out of order (status {self.status:#x})")
                return
            if bit == FEATURES_OK and not self._features_acceptable():
                return  # the driver reads the status back and sees FEATURES_OK unset
            self.status |= bit
            if bit == DRIVER_OK:
                device.activate()

    def _features_acceptable(self) -> bool:
        acked = self.device.acked_features
        if acked & ~self.offered_features:
            self.device.complain(
                f"the driver accepted features {acked & ~self.offered_features:#x} "
                "the device did not offer"
            )
            return False
        if not acked & F_VERSION_1:
            self.device.complain(
                "the driver did not accept VERSION_1 (legacy drivers are not served)"
            )
            return False
        return True

    def _read_config(self, offset: int, size: int) -> int:
        space = self.device.config_space()
        chunk = space[offset : offset + size]
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def _ignore(self, what: str) -> int:
        self.ignored_accesses += 1
        self.device.complain(f"ignored {what}")
        return 0
