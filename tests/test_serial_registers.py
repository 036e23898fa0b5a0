"""The 16550 alone, register by register, with a byte sink and an interrupt line
that records each edge: what a guest's driver sees, in milliseconds, without a VM."""

from __future__ import annotations

import io
import threading

import pytest

from dksm.devices import serial
from dksm.devices.serial import GuardedSink, Serial


class InterruptLine:
    """Counts the edges the UART raises."""

    def __init__(self) -> None:
        self.edges = 0

    def __call__(self) -> None:
        self.edges += 1


@pytest.fixture
def line() -> InterruptLine:
    return InterruptLine()


@pytest.fixture
def sink() -> io.BytesIO:
    return io.BytesIO()


@pytest.fixture
def uart(sink: io.BytesIO, line: InterruptLine) -> Serial:
    return Serial(sink, line)


def test_transmitted_bytes_reach_the_sink_in_order(uart: Serial, sink: io.BytesIO) -> None:
    for byte in b"ok\n":
        uart.write(serial.DATA, 1, byte)
    assert sink.getvalue() == b"ok\n"
    assert uart.bytes_written == 3


def test_line_status_says_the_transmitter_is_always_ready(uart: Serial) -> None:
    lsr = uart.read(serial.LSR, 1)
    assert lsr & serial.LSR_THR_EMPTY and lsr & serial.LSR_TRANSMITTER_EMPTY
    assert not lsr & serial.LSR_DATA_READY


def test_dlab_turns_data_and_ier_into_the_divisor_latch(uart: Serial, sink: io.BytesIO) -> None:
    assert (uart.read(serial.DATA, 1), uart.read(serial.IER, 1)) == (0, 0)  # DLAB clear
    uart.write(serial.LCR, 1, serial.LCR_DLAB | 0x03)
    assert (uart.read(serial.DATA, 1), uart.read(serial.IER, 1)) == (0x0C, 0)  # 9600 baud
    uart.write(serial.DATA, 1, 0x01)  # 115200 baud
    uart.write(serial.IER, 1, 0x00)
    assert (uart.read(serial.DATA, 1), uart.read(serial.IER, 1)) == (0x01, 0x00)
    assert sink.getvalue() == b""  # divisor writes are not output
    uart.write(serial.LCR, 1, 0x03)
    assert uart.read(serial.IER, 1) == 0 and uart.read(serial.LCR, 1) == 0x03


def test_enabling_thre_interrupts_at_once_and_iir_acknowledges_it(
    uart: Serial, line: InterruptLine
) -> None:
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_NO_INTERRUPT
    uart.write(serial.IER, 1, serial.IER_THRE)
    assert line.edges == 1
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_THRE
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_NO_INTERRUPT  # read once: gone
    uart.write(serial.DATA, 1, ord("x"))  # the THR empties again at once
    assert line.edges == 2
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_THRE


def test_no_interrupt_is_raised_while_none_is_enabled(uart: Serial, line: InterruptLine) -> None:
    uart.write(serial.DATA, 1, ord("x"))
    uart.receive(b"y")
    assert line.edges == 0
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_NO_INTERRUPT


def test_received_bytes_are_read_from_rbr_with_data_ready_and_an_interrupt(
    uart: Serial, line: InterruptLine
) -> None:
    uart.write(serial.IER, 1, serial.IER_RECEIVED_DATA)
    assert uart.receive(b"ab") == 2
    assert line.edges == 1
    assert uart.read(serial.LSR, 1) & serial.LSR_DATA_READY
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_RECEIVED_DATA
    assert uart.read(serial.DATA, 1) == ord("a")
    assert line.edges == 2  # edge-triggered: the next byte is announced again
    assert uart.read(serial.DATA, 1) == ord("b")
    assert not uart.read(serial.LSR, 1) & serial.LSR_DATA_READY
    assert uart.read(serial.DATA, 1) == 0  # nothing left reads as zero
    assert uart.bytes_received == 2


def test_received_data_outranks_thre_in_iir(uart: Serial) -> None:
    uart.write(serial.IER, 1, serial.IER_RECEIVED_DATA | serial.IER_THRE)
    uart.receive(b"z")
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_RECEIVED_DATA
    uart.read(serial.DATA, 1)
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_THRE


def test_enabling_receive_interrupts_with_input_waiting_interrupts(
    uart: Serial, line: InterruptLine
) -> None:
    uart.receive(b"q")
    assert line.edges == 0
    uart.write(serial.IER, 1, serial.IER_RECEIVED_DATA)
    assert line.edges == 1


def test_fifo_control_sets_iir_bits_and_clears_the_receiver(uart: Serial) -> None:
    uart.write(serial.IIR_FCR, 1, serial.FCR_FIFO_ENABLE)
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_FIFO_ENABLED | serial.IIR_NO_INTERRUPT
    uart.receive(b"lost")
    uart.write(serial.IIR_FCR, 1, serial.FCR_FIFO_ENABLE | serial.FCR_CLEAR_RECEIVER)
    assert uart.pending_input == 0


def test_loopback_sends_transmitted_bytes_back_not_to_the_sink(
    uart: Serial, sink: io.BytesIO
) -> None:
    uart.write(serial.MCR, 1, serial.MCR_LOOPBACK | serial.MCR_OUT2)
    uart.write(serial.DATA, 1, 0x5A)
    assert sink.getvalue() == b""
    assert uart.read(serial.DATA, 1) == 0x5A


def test_scratch_and_modem_registers(uart: Serial) -> None:
    uart.write(serial.SCR, 1, 0xA5)
    assert uart.read(serial.SCR, 1) == 0xA5
    assert uart.read(serial.MSR, 1) == serial.MSR_DEFAULT
    assert uart.read(serial.MCR, 1) == serial.MCR_OUT2


def test_input_beyond_capacity_waits_for_the_guest_to_read(uart: Serial) -> None:
    data = bytes(serial.RECEIVE_CAPACITY + 10)
    assert uart.receive(data) == serial.RECEIVE_CAPACITY
    assert uart.receive(b"more") == 0
    assert not uart.wait_for_room(0.01)
    reader = threading.Timer(0.05, uart.read, (serial.DATA, 1))
    reader.start()
    assert uart.wait_for_room(5)
    reader.join()
    assert uart.receive(b"xy") == 1


def test_a_failing_sink_ends_the_vm_once_and_drops_the_rest() -> None:
    class FullDisk:
        def write(self, data: bytes, /) -> int:
            raise OSError(28, "No space left on device")

    errors: list[OSError] = []
    guarded = GuardedSink(FullDisk())
    guarded.on_error = errors.append
    uart = Serial(guarded)
    for byte in b"abc":
        uart.write(serial.DATA, 1, byte)
    assert [e.errno for e in errors] == [28]
