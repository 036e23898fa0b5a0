"""virtio-net alone, its worker thread included: a datagram socket pair stands in for
the tap (both keep frame boundaries), a bytearray is guest RAM, the test is the
driver.  Frames cross in both directions with the 12-byte header where the
specification puts it, a guest without receive buffers makes the device stop
reading, and a receive buffer the device may not write asks for a reset."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from dksm.devices.virtio import transport as t
from dksm.devices.virtio.device import F_VERSION_1, DeviceWorker, Interrupt
from dksm.devices.virtio.net import F_MAC, HEADER_SIZE, Net
from dksm.devices.virtio.queue import DESC_F_WRITE, DESCRIPTOR

RAM = 1 << 20
SIZE = 8
QUEUES = {0: (0x1000, 0x2000, 0x3000), 1: (0x4000, 0x5000, 0x6000)}
MAC = bytes.fromhex("0600c0000202")


class NetDriver:
    def __init__(self) -> None:
        self.ram = bytearray(RAM)
        self.view = memoryview(self.ram)
        self.host, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tap.setblocking(False)
        self.tap = tap
        self.device = Net("eth0", self.view, tap.fileno(), MAC)
        self.irq = os.eventfd(0, os.EFD_NONBLOCK)
        self.device.interrupt = Interrupt(self.irq)
        self.events = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.mmio = t.MmioTransport(self.device, self.events)
        self.worker = DeviceWorker(self.device)
        for index, fd in enumerate(self.events):
            self.worker.watch(fd, self._notified(index, fd))
        self.worker.start()
        self.avail = {0: 0, 1: 0}

    def _notified(self, index: int, fd: int) -> Callable[[int], None]:
        def handler(events: int) -> None:
            os.eventfd_read(fd)
            self.device.notified(index)

        return handler

    def close(self) -> None:
        self.worker.close()
        for fd in [self.irq, *self.events]:
            os.close(fd)
        self.host.close()
        self.tap.close()

    def write(self, offset: int, value: int) -> None:
        self.mmio.write(offset, 4, value)

    def start(self) -> None:
        self.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER)
        for sel, value in ((0, F_MAC), (1, F_VERSION_1 >> 32)):
            self.write(t.DRIVER_FEATURES_SEL, sel)
            self.write(t.DRIVER_FEATURES, value)
        self.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK)
        for index, (desc, avail, used) in QUEUES.items():
            self.write(t.QUEUE_SEL, index)
            self.write(t.QUEUE_NUM, SIZE)
            self.write(t.QUEUE_DESC_LOW, desc)
            self.write(t.QUEUE_DRIVER_LOW, avail)
            self.write(t.QUEUE_DEVICE_LOW, used)
            self.write(t.QUEUE_READY, 1)
        self.write(t.STATUS, t.ACKNOWLEDGE | t.DRIVER | t.FEATURES_OK | t.DRIVER_OK)

    def offer(self, queue: int, slot: int, address: int, length: int, flags: int) -> None:
        desc, avail, _ = QUEUES[queue]
        DESCRIPTOR.pack_into(self.ram, desc + 16 * slot, address, length, flags, 0)
        struct.pack_into("<H", self.ram, avail + 4 + 2 * (self.avail[queue] % SIZE), slot)
        self.avail[queue] += 1
        struct.pack_into("<H", self.ram, avail + 2, self.avail[queue])
        os.eventfd_write(self.events[queue], 1)  # what KVM does for the guest's notify

    def used(self, queue: int) -> list[tuple[int, int]]:
        used = QUEUES[queue][2]
        idx = struct.unpack_from("<H", self.ram, used + 2)[0]
        return [struct.unpack_from("<II", self.ram, used + 4 + 8 * i) for i in range(idx)]


def wait_until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the device did not get there"
        time.sleep(0.005)


@pytest.fixture
def net() -> Iterator[NetDriver]:
    driver = NetDriver()
    yield driver
    driver.close()


def test_the_mac_is_offered_and_in_the_configuration(net: NetDriver) -> None:
    assert net.mmio.read(t.DEVICE_FEATURES, 4) & F_MAC
    config = bytes(net.mmio.read(t.CONFIG + i, 1) for i in range(6))
    assert config == MAC


def test_frames_cross_both_ways_with_the_header_where_it_belongs(net: NetDriver) -> None:
    net.start()
    frame = bytes(range(60))
    net.ram[0x10000 : 0x10000 + HEADER_SIZE + 60] = bytes(HEADER_SIZE) + frame
    net.offer(1, 0, 0x10000, HEADER_SIZE + 60, 0)
    assert net.host.recv(2048) == frame  # the driver's header stays in the guest
    wait_until(lambda: net.used(1) == [(0, 0)])
    net.offer(0, 0, 0x20000, 2048, DESC_F_WRITE)
    net.host.send(b"from the host")
    wait_until(lambda: net.used(0) == [(0, HEADER_SIZE + 13)])
    header = bytes(net.ram[0x20000 : 0x20000 + HEADER_SIZE])
    assert header == struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)  # num_buffers = 1
    assert bytes(net.ram[0x20000 + HEADER_SIZE : 0x20000 + HEADER_SIZE + 13]) == b"from the host"
    assert net.mmio.read(t.INTERRUPT_STATUS, 4) & 1


def test_without_receive_buffers_frames_wait_for_the_guest(net: NetDriver) -> None:
    net.start()
    net.host.send(b"early")
    time.sleep(0.1)
    assert net.used(0) == []  # nowhere to put it: the device waits, the frame is kept
    net.offer(0, 0, 0x20000, 2048, DESC_F_WRITE)
    wait_until(lambda: net.used(0) == [(0, HEADER_SIZE + 5)])
    assert net.device.rx_frames == 1


def test_a_receive_buffer_the_device_may_not_write_asks_for_a_reset(net: NetDriver) -> None:
    net.start()
    net.offer(0, 0, 0x20000, 2048, 0)  # device-readable: wrong for receiving
    net.host.send(b"x")
    wait_until(lambda: bool(net.mmio.read(t.STATUS, 4) & t.DEVICE_NEEDS_RESET))
    assert net.device.errors == 1
