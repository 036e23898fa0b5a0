"""The i8042 keyboard controller, reduced to what a microVM needs: its reset line,
and the one key combination a VMM sends (Ctrl+Alt+Del).

Writing 0xFE to the command port pulses the CPU reset; Firecracker treats it as the
guest asking to stop, and so do we (Linux with ``reboot=k``, Unikraft's shutdown).
Status reads say "input buffer empty" so that a polling guest never waits, and
"output buffer full" while keystrokes queued by :meth:`I8042.send_ctrl_alt_del`
wait to be read from the data port (each announced on IRQ 1, as Firecracker does).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

DATA_PORT = 0x60
COMMAND_PORT = 0x64
PORT_COUNT = 5  # 0x60..0x64
KEYBOARD_IRQ = 1
CMD_RESET_CPU = 0xFE
STATUS_EMPTY = 0x00
STATUS_OUTPUT_FULL = 0x01
# Ctrl, Alt and Del pressed, in scan code set 2 (what Firecracker's i8042 sends).
CTRL_ALT_DEL = (0x14, 0x11, 0xE0, 0x71)


class I8042:
    def __init__(
        self, on_reset: Callable[[], None], raise_irq: Callable[[], None] | None = None
    ) -> None:
        self.on_reset = on_reset
        self.raise_irq = raise_irq
        self._output: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()

    def send_ctrl_alt_del(self) -> None:
        """Queue the key presses for the guest and interrupt it."""
        with self._lock:
            self._output.extend(CTRL_ALT_DEL)
        if self.raise_irq is not None:
            self.raise_irq()

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0:  # data port
                if not self._output:
                    return 0
                value = self._output.popleft()
                more = bool(self._output)
            else:
                return STATUS_OUTPUT_FULL if self._output else STATUS_EMPTY
        if more and self.raise_irq is not None:
            self.raise_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == COMMAND_PORT - DATA_PORT and value & 0xFF == CMD_RESET_CPU:
            self.on_reset()
