"""The buses the vCPU loop dispatches exits through: port IO and MMIO, devices keyed
by address range, so the loop never changes when a device is added.

Unclaimed addresses read as zeros and ignore writes, as Firecracker answers them.
Real hardware with nothing behind a port floats to all ones, but guests built for
Firecracker poll ports it does not emulate and wait for a bit to clear (Unikraft's
clock waits on the RTC's update-in-progress bit; Linux probes for a second serial
port): with all ones they would spin forever.  MMIO nobody claims is answered the
same way."""

from __future__ import annotations

import bisect

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Protocol

    class BusDevice(Protocol):
        """A device seen through a window of addresses; ``offset`` is from its base and
        ``size`` is the access width in bytes (1, 2, 4 or 8)."""

        def read(self, offset: int, size: int) -> int: ...

        def write(self, offset: int, size: int, value: int) -> None: ...

    PortDevice = BusDevice  # a device behind IO ports


class Bus:
    """Devices on non-overlapping address ranges."""

    kind = "address"

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []
        self.unclaimed_accesses = 0

    def register(self, base: int, length: int, device: BusDevice) -> None:
        i = bisect.bisect_left(self._bases, base)
        if i > 0 and self._ranges[i - 1][1] > base:
            raise ValueError(f"{self.kind} range {base:#x}+{length} overlaps another device")
        if i < len(self._ranges) and base + length > self._ranges[i][0]:
            raise ValueError(f"{self.kind} range {base:#x}+{length} overlaps another device")
        self._bases.insert(i, base)
        self._ranges.insert(i, (base, base + length, device))

    def _find(self, address: int) -> tuple[int, BusDevice] | None:
        i = bisect.bisect_right(self._bases, address) - 1
        if i >= 0:
            base, end, device = self._ranges[i]
            if address < end:
                return base, device
        return None

    def read(self, address: int, size: int) -> int:
        found = self._find(address)
        if found is None:
            self.unclaimed_accesses += 1
            return 0
        base, device = found
        return device.read(address - base, size)

    def write(self, address: int, size: int, value: int) -> None:
        found = self._find(address)
        if found is None:
            self.unclaimed_accesses += 1
            return
        base, device = found
        device.write(address - base, size, value)


class PortBus(Bus):
    """The x86 IO-port space (``in``/``out``)."""

    kind = "port"


class MmioBus(Bus):
    """Guest-physical addresses outside RAM (the MMIO gap), reached through
    ``KVM_EXIT_MMIO``: the virtio-mmio devices' register windows."""

    kind = "MMIO"
