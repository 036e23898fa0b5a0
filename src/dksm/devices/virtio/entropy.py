"""virtio-rng (virtio 1.2, section 5.4), Firecracker's ``entropy`` device: every
buffer the driver offers is filled with bytes from the host's random source
(``getrandom``, the kernel's CSPRNG).  A request is device-writable buffers only;
a device-readable one is a guest error."""

from __future__ import annotations

import os

from dksm.devices.virtio.device import TYPE_ENTROPY, VirtioDevice
from dksm.devices.virtio.queue import QueueError, scatter

QUEUE_SIZE = 256  # Firecracker's
MAX_REQUEST = 64 * 1024  # bytes per buffer; a larger one is filled this far


class Entropy(VirtioDevice):
    device_type = TYPE_ENTROPY
    kind = "virtio-rng"

    def __init__(self, name: str, ram: memoryview) -> None:
        super().__init__(name, (QUEUE_SIZE,), ram)
        self.bytes_given = 0

    def queue_notified(self, index: int) -> None:
        queue = self.queues[index]
        served = False
        while (chain := queue.pop(self.ram)) is not None:
            if chain.readable:
                raise QueueError(f"request {chain.head} has a device-readable buffer")
            length = min(chain.writable_length, MAX_REQUEST)
            written = scatter(self.ram, chain.writable, os.getrandom(length))
            self.bytes_given += written
            self.used(index, chain.head, written)
            served = True
        if served:
            self.signal_used(index)
