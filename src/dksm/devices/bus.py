"""The port-IO bus: devices keyed by address range, so the vCPU loop never changes
when a device is added.

Unclaimed ports read as zeros and ignore writes, as Firecracker answers them.  Real
hardware with nothing behind a port floats to all ones, but guests built for
Firecracker poll ports it does not emulate and wait for a bit to clear (Unikraft's
clock waits on the RTC's update-in-progress bit; Linux probes for a second serial
port): with all ones they would spin forever."""

from __future__ import annotations

import bisect
from typing import Protocol


class PortDevice(Protocol):
    """A device seen through a window of IO ports; ``offset`` is from its base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class PortBus:
    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, PortDevice]] = []
        self.unclaimed_accesses = 0

    def register(self, base: int, length: int, device: PortDevice) -> None:
        i = bisect.bisect_left(self._bases, base)
        if i > 0 and self._ranges[i - 1][1] > base:
            raise ValueError(f"port range {base:#x}+{length} overlaps another device")
        if i < len(self._ranges) and base + length > self._ranges[i][0]:
            raise ValueError(f"port range {base:#x}+{length} overlaps another device")
        self._bases.insert(i, base)
        self._ranges.insert(i, (base, base + length, device))

    def _find(self, port: int) -> tuple[int, PortDevice] | None:
        i = bisect.bisect_right(self._bases, port) - 1
        if i >= 0:
            base, end, device = self._ranges[i]
            if port < end:
                return base, device
        return None

    def read(self, port: int, size: int) -> int:
        found = self._find(port)
        if found is None:
            self.unclaimed_accesses += 1
            return 0
        base, device = found
        return device.read(port - base, size)

    def write(self, port: int, size: int, value: int) -> None:
        found = self._find(port)
        if found is None:
            self.unclaimed_accesses += 1
            return
        base, device = found
        device.write(port - base, size, value)
