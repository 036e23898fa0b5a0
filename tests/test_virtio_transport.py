"""The virtio-mmio transport and split virtqueues alone, in milliseconds, as
vm-superio tests its devices: a bytearray is guest RAM, the test is the driver.

Every rule the guest can break is broken here once and must end in
DEVICE_NEEDS_RESET and a configuration interrupt, never an exception."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from dksm.devices.virtio import transport as t
from dksm.devices.virtio.device import (
    F_VERSION_1,
    INTERRUPT_CONFIG_CHANGE,
    INTERRUPT_USED_BUFFER,
    LOGGED_COMPLAINTS,
    Interrupt,
)
from dksm.devices.virtio.entropy import Entropy
from dksm.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE, DESCRIPTOR

RAM_SIZE = 1 << 20
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
SIZE = 8


class Driver:
    """Just enough of a virtio driver to poke the transport."""

    def __init__(self) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.view = memoryview(self.ram)
        self.device = Entropy("rng", self.view)
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.device.interrupt = Interrupt(self.irq_fd)
        self.events = [os.eventfd(0, os.EFD_NONBLOCK)]
        self.mmio = t.MmioTransport(self.device, self.events)
        self.avail_idx = 0

    def close(self) -> None:
        for fd in [self.irq_fd, *self.events]:
            os.close(fd)
        self.view.release()

    def read(self, offset: int) -> int:
        return self.mmio.read(offset, 4)

    def write(self, offset: int, value: int) -> None:
        self.mmio.write(offset, 4, value)

    def negotiate(self, features: int = F_VERSION_1) -> int:
        self.write(t.STATUS, 0)
        self.write(t.STATUS, t.ACKNOWLEDGE)
        self.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER)
        for sel in (0, 1):
            self.write(t.DRIVER_FEATURES_SEL, sel)
            self.write(t.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
        self.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK)
        return self.read(t.STATUS)

    def start(self, size: int = SIZE, ready: bool = True) -> None:
        assert self.negotiate() & t.FEATURES_OK
        self.write(t.QUEUE_SEL, 0)
        self.write(t.QUEUE_NUM, size)
        for low, value in (
            (t.QUEUE_DESC_LOW, DESC),
            (t.QUEUE_DRIVER_LOW, AVAIL),
            (t.QUEUE_DEVICE_LOW, USED),
        ):
            self.write(low, value)
            self.write(low + 4, 0)
        if ready:
            self.write(t.QUEUE_READY, 1)
        self.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK | t.DRIVER_OK)

    def descriptor(self, index: int, address: int, length: int, flags: int, nxt: int = 0) -> None:
        DESCRIPTOR.pack_into(self.ram, DESC + 16 * index, address, length, flags, nxt)

    def offer(self, head: int, count: int = 1) -> None:
        for _ in range(count):
            struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % SIZE), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)

    def kick(self) -> None:
        with self.device.lock:
            self.device.notified(0)

    def used(self) -> list[tuple[int, int]]:
        idx = struct.unpack_from("<H", self.ram, USED + 2)[0]
        return [struct.unpack_from("<II", self.ram, USED + 4 + 8 * i) for i in range(idx)]

    @property
    def needs_reset(self) -> bool:
        return bool(self.read(t.STATUS) & t.DEVICE_NEEDS_RESET)


@pytest.fixture
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


def test_identity_registers_say_virtio_mmio_version_2(driver: Driver) -> None:
    assert driver.read(t.MAGIC_VALUE) == 0x74726976
    assert driver.read(t.VERSION_REG) == 2
    assert driver.read(t.DEVICE_ID) == 4
    driver.write(t.DEVICE_FEATURES_SEL, 1)
    assert driver.read(t.DEVICE_FEATURES) & 1  # VERSION_1 is bit 32
    driver.write(t.QUEUE_SEL, 0)
    assert driver.read(t.QUEUE_NUM_MAX) == 256
    driver.write(t.QUEUE_SEL, 1)
    assert driver.read(t.QUEUE_NUM_MAX) == 0  # no second queue
    assert driver.read(t.SHM_LEN_LOW) == 0xFFFF_FFFF  # no shared memory regions


def test_features_ok_is_refused_without_version_1_or_with_unoffered_bits(driver: Driver) -> None:
    assert not driver.negotiate(0) & t.FEATURES_OK
    assert not driver.negotiate(F_VERSION_1 | 1 << 3) & t.FEATURES_OK
    assert driver.negotiate(F_VERSION_1) & t.FEATURES_OK


def test_status_bits_cannot_be_skipped_or_cleared(driver: Driver) -> None:
    driver.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK | t.DRIVER_OK)
    assert driver.read(t.STATUS) == t.ACKNOWLEDGE | t.DRIVER  # stopped at FEATURES_OK
    driver.write(t.STATUS, t.ACKNOWLEDGE)  # clears DRIVER: ignored
    assert driver.read(t.STATUS) == t.ACKNOWLEDGE | t.DRIVER
    assert driver.mmio.ignored_accesses >= 1


def test_registers_want_32_bit_accesses_and_config_space_any_width(driver: Driver) -> None:
    assert driver.mmio.read(t.MAGIC_VALUE, 1) == 0
    assert driver.mmio.ignored_accesses == 1
    assert driver.mmio.read(t.CONFIG, 4) == 0  # entropy has no configuration


def test_a_request_is_filled_and_interrupts(driver: Driver) -> None:
    driver.start()
    driver.descriptor(0, 0x8000, 64, DESC_F_WRITE)
    driver.offer(0)
    driver.kick()
    assert driver.used() == [(0, 64)]
    assert bytes(driver.ram[0x8000:0x8040]) != bytes(64)
    assert driver.read(t.INTERRUPT_STATUS) == INTERRUPT_USED_BUFFER
    assert os.eventfd_read(driver.irq_fd) == 1
    driver.write(t.INTERRUPT_ACK, INTERRUPT_USED_BUFFER)
    assert driver.read(t.INTERRUPT_STATUS) == 0


def test_a_driver_that_asks_for_no_interrupt_gets_none(driver: Driver) -> None:
    driver.start()
    struct.pack_into("<H", driver.ram, AVAIL, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    driver.descriptor(0, 0x8000, 8, DESC_F_WRITE)
    driver.offer(0)
    driver.kick()
    assert driver.used() == [(0, 8)]
    with pytest.raises(BlockingIOError):
        os.eventfd_read(driver.irq_fd)


W, N = DESC_F_WRITE, DESC_F_NEXT
# Each case: descriptors (index, address, length, flags, next), then the head offered
# and how many times.
BROKEN: dict[str, tuple[list[tuple[int, int, int, int, int]], int, int]] = {
    "outside RAM": ([(0, RAM_SIZE - 8, 64, W, 0)], 0, 1),
    "loop": ([(0, 0x8000, 8, W | N, 1), (1, 0x8100, 8, W | N, 0)], 0, 1),
    "readable after writable": ([(0, 0x8000, 8, W | N, 1), (1, 0x8100, 8, 0, 0)], 0, 1),
    "readable for entropy": ([(0, 0x8000, 8, 0, 0)], 0, 1),
    "head beyond the queue": ([], SIZE + 3, 1),
    "next beyond the queue": ([(0, 0x8000, 8, W | N, 999)], 0, 1),
    "indirect": ([(0, 0x8000, 16, 4, 0)], 0, 1),
    "index far ahead": ([(0, 0x8000, 8, W, 0)], 0, SIZE + 1),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_queue_asks_for_a_reset_and_a_reset_recovers(
    driver: Driver, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    driver.start()
    descriptors, head, count = BROKEN[case]
    for descriptor in descriptors:
        driver.descriptor(*descriptor)
    driver.offer(head, count)
    driver.kick()
    assert driver.needs_reset
    assert driver.read(t.INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE
    assert driver.device.errors == 1
    assert any("needs a reset" in r.getMessage() for r in caplog.records)
    assert driver.used() == []  # nothing was served
    driver.write(t.STATUS, 0)
    assert driver.read(t.STATUS) == 0 and driver.read(t.INTERRUPT_STATUS) == 0
    driver.ram[DESC : USED + 0x100] = bytes(USED + 0x100 - DESC)
    driver.avail_idx = 0
    driver.start()
    driver.descriptor(0, 0x8000, 16, DESC_F_WRITE)
    driver.offer(0)
    driver.kick()
    assert driver.used() == [(0, 16)] and not driver.needs_reset


def test_queues_outside_ram_or_misaligned_fail_activation(driver: Driver) -> None:
    assert driver.negotiate() & t.FEATURES_OK
    driver.write(t.QUEUE_SEL, 0)
    driver.write(t.QUEUE_NUM, SIZE)
    driver.write(t.QUEUE_DESC_LOW, DESC + 8)  # descriptor tables are 16-byte aligned
    driver.write(t.QUEUE_DRIVER_LOW, AVAIL)
    driver.write(t.QUEUE_DEVICE_LOW, USED)
    driver.write(t.QUEUE_DEVICE_HIGH, 1)  # 4 GiB up: outside RAM
    driver.write(t.QUEUE_READY, 1)
    driver.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK | t.DRIVER_OK)
    assert driver.needs_reset and not driver.device.activated


def test_queue_sizes_must_be_powers_of_two_up_to_the_maximum(driver: Driver) -> None:
    driver.start(size=6)
    assert driver.needs_reset
    driver.write(t.STATUS, 0)
    driver.start(size=512)
    assert driver.needs_reset


def test_a_notification_before_driver_ok_or_for_an_unready_queue_is_an_error(
    driver: Driver,
) -> None:
    assert driver.negotiate() & t.FEATURES_OK
    driver.kick()
    assert driver.needs_reset
    driver.write(t.STATUS, 0)
    driver.start(ready=False)
    driver.kick()
    assert driver.needs_reset


def test_queue_registers_are_frozen_once_the_queue_is_ready(driver: Driver) -> None:
    driver.start()
    driver.write(t.QUEUE_SEL, 0)
    assert driver.read(t.QUEUE_READY) == 1
    driver.write(t.QUEUE_DESC_LOW, 0x5000)  # after DRIVER_OK: ignored
    assert driver.read(t.QUEUE_DESC_LOW) == DESC


def test_an_unmatched_notify_write_reaches_the_queue_eventfd(driver: Driver) -> None:
    driver.write(t.QUEUE_NOTIFY, 0)  # what KVM forwards when no ioeventfd matched
    assert os.eventfd_read(driver.events[0]) == 1
    driver.start()
    driver.write(t.QUEUE_NOTIFY, 7)  # no such queue
    assert driver.needs_reset


def test_a_guest_cannot_flood_the_log(driver: Driver, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(200):
        driver.mmio.read(t.MAGIC_VALUE, 2)  # a register read of the wrong width
        driver.write(t.STATUS, 0)
        driver.start()
        driver.kick()
        driver.offer(SIZE + 1)  # head beyond the queue: a reset each time
        driver.kick()
    assert driver.device.errors == 200
    assert len(caplog.records) == LOGGED_COMPLAINTS + 1
    assert "further complaints" in caplog.records[-1].getMessage()
