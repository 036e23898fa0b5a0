"""Split virtqueues (virtio 1.2, section 2.7), read and written in guest RAM.

The guest owns the three areas of a queue and may put anything in them, so
nothing read from them is trusted: every descriptor must lie inside guest RAM, a
chain may hold at most as many descriptors as the queue (which also catches
loops), device-readable descriptors must come before device-writable ones, and
the available index may run ahead of the device by at most the queue size.  A
breach raises :class:`QueueError`; the device then stops using the queue and asks
for a reset (see :mod:`dksm.devices.virtio.device`), and the VMM goes on.

Ordering: the device reads the available index before the entries it covers and
writes a used entry before the used index that publishes it.  x86 keeps stores in
order and loads in order, so program order is enough here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dksm.error import DksmError

DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEMENT = struct.Struct("<II")  # id, len
U16 = struct.Struct("<H")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1

# Areas' alignment (2.7): descriptor table 16, available ring 2, used ring 4.
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_SIZE = 32768  # the largest split queue the specification allows


class QueueError(DksmError):
    """The guest broke a rule of the virtqueue; the message says which."""


@dataclass(frozen=True)
class Chain:
    """One request: the head descriptor's index and the guest memory it names,
    device-readable parts first, then device-writable ones, as (address, length)."""

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]

    @property
    def readable_length(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(length for _, length in self.writable)


def check_range(ram: memoryview, address: int, length: int, what: str) -> None:
    if address < 0 or length < 0 or address + length > len(ram):
        raise QueueError(
            f"{what} at {address:#x}+{length:#x} lies outside guest RAM ({len(ram):#x} bytes)"
        )


def gather(ram: memoryview, parts: tuple[tuple[int, int], ...], limit: int | None = None) -> bytes:
    """The bytes of ``parts`` one after another (the first ``limit`` of them)."""
    chunks = []
    left = limit
    for address, length in parts:
        if left is not None:
            length = min(length, left)
            left -= length
        chunks.append(ram[address : address + length])
        if left == 0:
            break
    return b"".join(chunks)


def views(
    ram: memoryview, parts: tuple[tuple[int, int], ...], skip: int, length: int
) -> list[memoryview]:
    """Views of ``length`` bytes of ``parts`` after the first ``skip`` (for vectored IO)."""
    out = []
    for address, size in parts:
        if skip >= size:
            skip -= size
            continue
        take = min(size - skip, length)
        if take > 0:
            out.append(ram[address + skip : address + skip + take])
            length -= take
        skip = 0
        if length == 0:
            break
    return out


def scatter(ram: memoryview, parts: tuple[tuple[int, int], ...], data: bytes, skip: int = 0) -> int:
    """Write ``data`` into ``parts`` after the first ``skip`` bytes; returns bytes written."""
    written = 0
    for view in views(ram, parts, skip, len(data)):
        view[:] = data[written : written + len(view)]
        written += len(view)
    return written


class Virtqueue:
    """One split virtqueue as the driver configured it through the transport."""

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= MAX_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to {MAX_SIZE}")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0  # free-running 16-bit counters, as in the rings
        self.next_used = 0

    def validate(self, ram: memoryview) -> None:
        """Check what the driver configured before the device uses the queue."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two up to {self.max_size}")
        for name, address, length, align in (
            ("descriptor table", self.desc_table, DESCRIPTOR.size * size, DESC_ALIGN),
            ("available ring", self.avail_ring, 6 + 2 * size, AVAIL_ALIGN),
            ("used ring", self.used_ring, 6 + USED_ELEMENT.size * size, USED_ALIGN),
        ):
            if address % align:
                raise QueueError(f"{name} at {address:#x} is not {align}-byte aligned")
            check_range(ram, address, length, name)
        self.next_avail = 0  # both indexes start at zero on a freshly enabled queue
        self.next_used = 0

    def pop(self, ram: memoryview) -> Chain | None:
        """The next available chain, checked, or None if the driver offered none."""
        avail_idx = U16.unpack_from(ram, self.avail_ring + 2)[0]
        waiting = (avail_idx - self.next_avail) & 0xFFFF
        if waiting == 0:
            return None
        if waiting > self.size:
            raise QueueError(
                f"available index {avail_idx} is {waiting} entries ahead of the device, "
                f"more than the queue's {self.size}"
            )
        slot = self.avail_ring + 4 + 2 * (self.next_avail % self.size)
        head = U16.unpack_from(ram, slot)[0]
        chain = self._walk(ram, head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _walk(self, ram: memoryview, head: int) -> Chain:
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        index = head
        for _ in range(self.size):
            if index >= self.size:
                raise QueueError(f"descriptor index {index} is beyond the queue's {self.size}")
            address, length, flags, following = DESCRIPTOR.unpack_from(
                ram, self.desc_table + DESCRIPTOR.size * index
            )
            if flags & DESC_F_INDIRECT:
                raise QueueError(f"descriptor {index} is indirect, which was not negotiated")
            check_range(ram, address, length, f"descriptor {index}")
            if flags & DESC_F_WRITE:
                writable.append((address, length))
            elif writable:
                raise QueueError(
                    f"descriptor {index} is device-readable after a device-writable one"
                )
            else:
                readable.append((address, length))
            if not flags & DESC_F_NEXT:
                return Chain(head, tuple(readable), tuple(writable))
            index = following
        raise QueueError(
            f"the chain from descriptor {head} is longer than the queue ({self.size}): a loop?"
        )

    def put_used(self, ram: memoryview, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, saying ``written`` bytes were written."""
        slot = self.used_ring + 4 + USED_ELEMENT.size * (self.next_used % self.size)
        USED_ELEMENT.pack_into(ram, slot, head, written)
        self.next_used = (self.next_used + 1) & 0xFFFF
        U16.pack_into(ram, self.used_ring + 2, self.next_used)

    def wants_interrupt(self, ram: memoryview) -> bool:
        flags: int = U16.unpack_from(ram, self.avail_ring)[0]
        return not flags & AVAIL_F_NO_INTERRUPT
