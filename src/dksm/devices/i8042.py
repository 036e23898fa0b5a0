"""The i8042 keyboard controller, reduced to what a microVM needs: its reset line.

Writing 0xFE to the command port pulses the CPU reset; Firecracker treats it as the
guest asking to stop, and so do we (Linux with ``reboot=k``, Unikraft's shutdown).
Status reads say "no data, input buffer empty" so that a polling guest never waits.
"""

from __future__ import annotations

from collections.abc import Callable

DATA_PORT = 0x60
COMMAND_PORT = 0x64
PORT_COUNT = 5  # 0x60..0x64
CMD_RESET_CPU = 0xFE
STATUS_EMPTY = 0x00


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset

    def read(self, offset: int, size: int) -> int:
        return STATUS_EMPTY

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == COMMAND_PORT - DATA_PORT and value & 0xFF == CMD_RESET_CPU:
            self.on_reset()
