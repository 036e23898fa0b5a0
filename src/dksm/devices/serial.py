"""A 16550A UART, enough of it for a console in both directions.

Unikraft polls LSR; Linux drives the port with interrupts (transmit-holding-register
empty, received data available).  Transmitted bytes go to a binary sink (stdout or a
file) unbuffered, so a guest's output is seen as it is written and survives a crash
of the VMM.  Received bytes come from :meth:`Serial.receive` (``dksm run`` forwards
its standard input, as Firecracker does) and wait in a bounded queue: a writer that
finds it full waits for the guest to read (:meth:`Serial.wait_for_room`), so input
is never dropped and never grows without bound.

The device is used from vCPU threads and an input thread at once; one lock keeps
its registers consistent.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Protocol

    class ByteSink(Protocol):
        """Where transmitted bytes go: a binary file, or anything that writes bytes."""

        def write(self, data: bytes, /) -> object: ...


COM1_PORT = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8

# Register offsets from the base port.
DATA = 0  # THR on write, RBR on read; DLL when LCR.DLAB is set
IER = 1  # interrupt enable; DLM when LCR.DLAB is set
IIR_FCR = 2  # IIR on read, FCR on write
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
IER_RECEIVED_DATA = 0x01
IER_THRE = 0x02
IER_MASK = 0x0F
IIR_NO_INTERRUPT = 0x01
IIR_THRE = 0x02
IIR_RECEIVED_DATA = 0x04
IIR_FIFO_ENABLED = 0xC0
FCR_FIFO_ENABLE = 0x01
FCR_CLEAR_RECEIVER = 0x02
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40
MSR_DEFAULT = 0xB0  # DCD, DSR, CTS: a terminal is attached
MCR_OUT2 = 0x08
MCR_LOOPBACK = 0x10

# Bytes of input held for the guest; the 16550's own FIFO is 16, Firecracker's 64.
# More lets a paste arrive whole while the guest is busy.
RECEIVE_CAPACITY = 4096


class GuardedSink:
    """A sink whose first write error (a full disk, a reader that went away) is
    handed to ``on_error``, which ends the VM, instead of escaping into the vCPU
    loop as if it were a VMM bug; the bytes after it are dropped.  ``on_error`` is
    set once the VM exists, before the guest can write."""

    def __init__(self, sink: ByteSink) -> None:
        self.sink = sink
        self.on_error: Callable[[OSError], None] | None = None
        self.error: OSError | None = None

    def write(self, data: bytes, /) -> object:
        if self.error is not None:
            return 0
        try:
            return self.sink.write(data)
        except OSError as exc:
            self.error = exc
            if self.on_error is None:
                raise
            self.on_error(exc)
            return 0


class Serial:
    def __init__(self, sink: ByteSink, raise_irq: Callable[[], None] | None = None) -> None:
        self.sink = sink
        self.raise_irq = raise_irq
        self.ier = 0
        self.lcr = 0
        self.mcr = MCR_OUT2  # lets the interrupt reach the PIC on PC hardware
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fifo_enabled = False
        self.thre_pending = False
        self.bytes_written = 0
        self.bytes_received = 0
        self._received: collections.deque[int] = collections.deque()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)

    # -- input from the host --------------------------------------------------

    def receive(self, data: bytes) -> int:
        """Queue bytes for the guest to read; returns how many fitted."""
        with self._lock:
            accepted = data[: RECEIVE_CAPACITY - len(self._received)]
            if not accepted:
                return 0
            was_empty = not self._received
            self._received.extend(accepted)
            if was_empty and self.ier & IER_RECEIVED_DATA:
                self._signal()
            return len(accepted)

    def wait_for_room(self, timeout: float) -> bool:
        """Wait until the guest has read something from a full queue (or timeout)."""
        with self._room:
            return self._room.wait_for(lambda: len(self._received) < RECEIVE_CAPACITY, timeout)

    @property
    def pending_input(self) -> int:
        with self._lock:
            return len(self._received)

    # -- the port interface ---------------------------------------------------

    def _signal(self) -> None:
        if self.raise_irq is not None:
            self.raise_irq()

    def _interrupt_identification(self) -> int:
        fifo = IIR_FIFO_ENABLED if self.fifo_enabled else 0
        if self.ier & IER_RECEIVED_DATA and self._received:
            return fifo | IIR_RECEIVED_DATA
        if self.thre_pending:
            self.thre_pending = False  # reading IIR acknowledges THRE
            return fifo | IIR_THRE
        return fifo | IIR_NO_INTERRUPT

    def _transmit_empty(self) -> None:
        if self.ier & IER_THRE:
            self.thre_pending = True
            self._signal()

    def _take_received(self) -> int:
        if not self._received:
            return 0
        value = self._received.popleft()
        self.bytes_received += 1
        self._room.notify_all()
        if self._received and self.ier & IER_RECEIVED_DATA:
            self._signal()  # edge-triggered line: announce the next byte
        return value

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA:
                return self.dll if self.lcr & LCR_DLAB else self._take_received()
            if offset == IER:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if offset == IIR_FCR:
                return self._interrupt_identification()
            if offset == LCR:
                return self.lcr
            if offset == MCR:
                return self.mcr
            if offset == LSR:
                ready = LSR_DATA_READY if self._received else 0
                return LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY | ready
            if offset == MSR:
                return MSR_DEFAULT
            return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == DATA:
                if self.lcr & LCR_DLAB:
                    self.dll = value
                    return
                if self.mcr & MCR_LOOPBACK:
                    if len(self._received) < RECEIVE_CAPACITY:
                        self._received.append(value)
                else:
                    self.sink.write(bytes((value,)))
                    self.bytes_written += 1
                self._transmit_empty()
            elif offset == IER:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                    return
                enabled = value & ~self.ier
                self.ier = value & IER_MASK
                if value & IER_THRE:
                    self._transmit_empty()  # an empty THR interrupts whenever enabled
                if enabled & IER_RECEIVED_DATA and self._received:
                    self._signal()
            elif offset == IIR_FCR:
                self.fifo_enabled = bool(value & FCR_FIFO_ENABLE)
                if value & FCR_CLEAR_RECEIVER:
                    self._received.clear()
                    self._room.notify_all()
            elif offset == LCR:
                self.lcr = value
            elif offset == MCR:
                self.mcr = value
            elif offset == SCR:
                self.scr = value
