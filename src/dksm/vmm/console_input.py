"""The host side of the serial console's input: a file descriptor forwarded to COM1.

``dksm run`` gives the guest its standard input, as Firecracker does: bytes read from
the descriptor are queued in the serial port (:meth:`dksm.devices.serial.Serial.receive`),
which raises the guest's receive interrupt when it asked for one.  A thread of its
own reads, so a guest that never reads costs nothing and a slow one only makes the
reader wait (the port's queue is bounded); end of input simply stops the thread.

When the descriptor is a terminal it is switched out of line mode and local echo for
the VM's lifetime, so keys reach the guest as typed and the guest's own echo is the
only one; signals (Ctrl-C) still reach dksm.  The terminal's settings are restored
when forwarding stops, on every path that runs Python code.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading

from dksm.devices.serial import Serial

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Any

POLL_INTERVAL_S = 0.1
READ_SIZE = 4096


class ConsoleInput:
    """Forward ``fd`` to ``serial`` from :meth:`start` until :meth:`stop`.

    Entering it (``with``) switches a terminal to character mode and no more, so that
    a VMM can do that while it still may and start the reader thread after it has
    confined itself (a thread started before would keep privileges the process gives
    up, such as its capability bounding set)."""

    def __init__(self, fd: int, serial: Serial) -> None:
        self.fd = fd
        self.serial = serial
        self.bytes_forwarded = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved_terminal: list[Any] | None = None

    def start(self) -> None:
        if self._saved_terminal is None:
            self._enter_character_mode()
        self._thread = threading.Thread(target=self._forward, name="console-input", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2 * POLL_INTERVAL_S)
        self._restore_terminal()

    def __enter__(self) -> ConsoleInput:
        self._enter_character_mode()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _forward(self) -> None:
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], POLL_INTERVAL_S)
                if not ready:
                    continue
                data = os.read(self.fd, READ_SIZE)
            except (OSError, ValueError):
                return  # closed or unreadable: the guest simply gets no more input
            if not data:
                return  # end of input
            while data and not self._stopping.is_set():
                taken = self.serial.receive(data)
                self.bytes_forwarded += taken
                data = data[taken:]
                if data:
                    self.serial.wait_for_room(POLL_INTERVAL_S)

    def _enter_character_mode(self) -> None:
        if not os.isatty(self.fd):
            return
        import termios

        try:
            saved = termios.tcgetattr(self.fd)
        except termios.error:
            return
        mode: list[Any] = list(saved)
        mode[3] &= ~(termios.ICANON | termios.ECHO)
        mode[6] = list(mode[6])
        mode[6][termios.VMIN] = 1
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        self._saved_terminal = saved

    def _restore_terminal(self) -> None:
        if self._saved_terminal is None:
            return
        import termios

        with contextlib.suppress(termios.error):
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved_terminal)
        self._saved_terminal = None
