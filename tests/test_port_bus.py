"""The port bus alone: devices found by range, offsets from their base, overlaps
refused, and ports nobody claims reading as zeros."""

from __future__ import annotations

import pytest

from dksm.devices.bus import PortBus


class Latch:
    """A device that remembers what was written where, and reads back offset + 0x10."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return offset + 0x10

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def test_accesses_reach_the_device_at_their_offset() -> None:
    bus = PortBus()
    low, high = Latch(), Latch()
    bus.register(0x60, 5, low)
    bus.register(0x3F8, 8, high)
    assert bus.read(0x64, 1) == 0x14
    assert bus.read(0x3F8, 1) == 0x10
    assert bus.read(0x3FF, 1) == 0x17
    bus.write(0x3FD, 2, 0xBEEF)
    assert high.writes == [(5, 2, 0xBEEF)] and low.writes == []
    assert bus.unclaimed_accesses == 0


def test_ports_outside_every_range_read_zero_and_are_counted() -> None:
    bus = PortBus()
    latch = Latch()
    bus.register(0x70, 2, latch)
    assert bus.read(0x6F, 1) == 0
    assert bus.read(0x72, 1) == 0  # one past the end
    assert bus.read(0x2F8, 1) == 0  # COM2: nobody there
    bus.write(0x80, 1, 0xFF)  # the POST port
    assert latch.writes == []
    assert bus.unclaimed_accesses == 4


def test_an_empty_bus_claims_nothing() -> None:
    bus = PortBus()
    assert bus.read(0, 4) == 0
    bus.write(0xFFFF, 1, 1)
    assert bus.unclaimed_accesses == 2


@pytest.mark.parametrize(
    ("base", "length"),
    [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FA, 2), (0x3F0, 0x20)],
    ids=["same", "reaches-in", "last-port", "inside", "covers"],
)
def test_overlapping_ranges_are_refused(base: int, length: int) -> None:
    bus = PortBus()
    bus.register(0x3F8, 8, Latch())
    with pytest.raises(ValueError, match="overlaps another device"):
        bus.register(base, length, Latch())


def test_adjacent_ranges_both_work() -> None:
    bus = PortBus()
    below, middle, above = Latch(), Latch(), Latch()
    bus.register(0x3F8, 8, middle)
    bus.register(0x3F0, 8, below)
    bus.register(0x400, 1, above)
    assert (bus.read(0x3F7, 1), bus.read(0x3F8, 1), bus.read(0x400, 1)) == (0x17, 0x10, 0x10)
