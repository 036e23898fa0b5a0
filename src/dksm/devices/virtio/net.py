"""virtio-net (virtio 1.2, section 5.1) over a host tap device.

Queue 0 receives (frames from the tap into buffers the driver offered), queue 1
transmits (frames from the driver to the tap).  Every frame is preceded in guest
memory by the 12-byte ``virtio_net_hdr``; no offloads are offered, so the header
the device writes is all zeros but ``num_buffers`` = 1, and the one the driver
writes is dropped.  When the driver offers no receive buffer the device stops
reading the tap (the kernel queues or drops, as for a slow reader) until the
driver notifies the receive queue again.  ``guest_mac`` is offered as
``VIRTIO_NET_F_MAC``.
"""

from __future__ import annotations

import os
import select
import struct

from dksm.devices.virtio.device import TYPE_NET, VirtioDevice, log
from dksm.devices.virtio.queue import QueueError, gather, scatter

QUEUE_SIZE = 256  # Firecracker's
RX_QUEUE = 0
TX_QUEUE = 1
F_MAC = 1 << 5
HEADER_SIZE = 12  # struct virtio_net_hdr_v1, num_buffers included
RX_HEADER = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1)  # no offload, one buffer
MAX_FRAME = 65535 + 14  # the largest IPv4 packet in an Ethernet frame
LOGGED_TAP_ERRORS = 10


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"'{text}' is not a MAC address like 06:00:ac:10:00:02") from None


class Net(VirtioDevice):
    device_type = TYPE_NET
    kind = "virtio-net"

    def __init__(self, name: str, ram: memoryview, tap_fd: int, mac: bytes | None) -> None:
        super().__init__(name, (QUEUE_SIZE, QUEUE_SIZE), ram)
        self.tap_fd = tap_fd
        self.mac = mac
        self._pending: bytes | None = None  # a frame read from the tap, not yet delivered
        self._watching = False
        self.rx_frames = 0
        self.tx_frames = 0
        self.rx_dropped = 0
        self.tx_dropped = 0

    def offered_features(self) -> int:
        return F_MAC if self.mac is not None else 0

    def config_space(self) -> bytes:
        return (self.mac or bytes(6)) + struct.pack("<H", 0)

    def on_activate(self) -> None:
        if self.worker is not None and not self._watching:
            self.worker.watch(self.tap_fd, self._tap_readable)
            self._watching = True

    def on_reset(self) -> None:
        if self.worker is not None and self._watching:
            self.worker.unwatch(self.tap_fd)
            self._watching = False
        self._pending = None

    def queue_notified(self, index: int) -> None:
        if index == RX_QUEUE:
            if self._watching and self.worker is not None:
                self.worker.modify(self.tap_fd, select.EPOLLIN)  # buffers again: read on
            self._receive()
        else:
            self._transmit()

    def _tap_readable(self, events: int) -> None:
        self._receive()

    def _receive(self) -> None:
        queue = self.queues[RX_QUEUE]
        delivered = False
        while True:
            if self._pending is None:
                try:
                    self._pending = os.read(self.tap_fd, MAX_FRAME)
                except BlockingIOError:
                    break
                except OSError as exc:  # never retried: it would spin on the same error
                    self._tap_error("read", exc)
                    self.on_reset()
                    break
            if not queue.ready:
                break
            chain = queue.pop(self.ram)
            if chain is None:
                # No room: stop reading the tap until the driver offers buffers.
                if self.worker is not None and self._watching:
                    self.worker.modify(self.tap_fd, 0)
                break
            if chain.readable:
                raise QueueError(f"receive buffer {chain.head} has a device-readable part")
            frame, self._pending = self._pending, None
            if chain.writable_length < HEADER_SIZE + len(frame):
                self.rx_dropped += 1
                self.used(RX_QUEUE, chain.head, 0)
            else:
                written = scatter(self.ram, chain.writable, RX_HEADER + frame)
                self.used(RX_QUEUE, chain.head, written)
                self.rx_frames += 1
            delivered = True
        if delivered:
            self.signal_used(RX_QUEUE)

    def _transmit(self) -> None:
        queue = self.queues[TX_QUEUE]
        served = False
        while (chain := queue.pop(self.ram)) is not None:
            if chain.writable:
                raise QueueError(f"transmit buffer {chain.head} has a device-writable part")
            length = chain.readable_length
            if HEADER_SIZE < length <= HEADER_SIZE + MAX_FRAME:
                frame = gather(self.ram, chain.readable)[HEADER_SIZE:]
                try:
                    os.write(self.tap_fd, frame)
                    self.tx_frames += 1
                except OSError as exc:  # a tap that went down: the frame is lost
                    self.tx_dropped += 1
                    self._tap_error("write", exc)
            else:
                self.tx_dropped += 1
            self.used(TX_QUEUE, chain.head, 0)
            served = True
        if served:
            self.signal_used(TX_QUEUE)

    def _tap_error(self, what: str, exc: OSError) -> None:
        if self.tx_dropped + self.rx_dropped <= LOGGED_TAP_ERRORS:
            log.warning("%s: tap %s failed: %s", self.label, what, exc.strerror)

    def close(self) -> None:
        os.close(self.tap_fd)
