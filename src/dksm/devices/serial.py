"""A 16550A UART, enough of it for a console: Unikraft polls LSR, Linux drives it
with the transmit-holding-register-empty interrupt.  Transmitted bytes go to a
binary sink (stdout or a file) unbuffered, so a guest's output is seen as it is
written and survives a crash of the VMM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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
IER_THRE = 0x02
IIR_NO_INTERRUPT = 0x01
IIR_THRE = 0x02
IIR_FIFO_ENABLED = 0xC0
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_TRANSMITTER_EMPTY = 0x40
MSR_DEFAULT = 0xB0  # DCD, DSR, CTS: a terminal is attached
MCR_LOOPBACK = 0x10


class ByteSink(Protocol):
    """Where transmitted bytes go: a binary file, or anything that writes bytes."""

    def write(self, data: bytes, /) -> object: ...


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
        self.mcr = 0x08  # OUT2: lets the interrupt reach the PIC on PC hardware
        self.scr = 0
        self.dll = 0x0C  # 9600 baud
        self.dlm = 0
        self.fifo_enabled = False
        self.thre_pending = False
        self.bytes_written = 0

    def _interrupt(self) -> None:
        if self.ier & IER_THRE:
            self.thre_pending = True
            if self.raise_irq is not None:
                self.raise_irq()

    def read(self, offset: int, size: int) -> int:
        if offset == DATA:
            return self.dll if self.lcr & LCR_DLAB else 0
        if offset == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == IIR_FCR:
            fifo = IIR_FIFO_ENABLED if self.fifo_enabled else 0
            if self.thre_pending:
                self.thre_pending = False
                return fifo | IIR_THRE
            return fifo | IIR_NO_INTERRUPT
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY
        if offset == MSR:
            return MSR_DEFAULT
        return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == DATA:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if not self.mcr & MCR_LOOPBACK:
                self.sink.write(bytes((value,)))
                self.bytes_written += 1
            self._interrupt()
        elif offset == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            self.ier = value & 0x0F
            self._interrupt()  # enabling THRE with an empty THR interrupts at once
        elif offset == IIR_FCR:
            self.fifo_enabled = bool(value & 0x01)
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value
        elif offset == SCR:
            self.scr = value
