"""The legacy devices alone, in milliseconds, as vm-superio tests its own: the CMOS
RTC's registers against a fixed clock, the UART's receive path and interrupts, and
the port bus's answer for ports nobody claims."""

from __future__ import annotations

import calendar
import threading

import pytest

from dksm.devices import rtc, serial
from dksm.devices.bus import PortBus

# 2026-12-03 (a Thursday) 14:05:09.25 UTC
T0 = calendar.timegm((2026, 12, 3, 14, 5, 9)) + 0.25


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def register(device: rtc.CmosRtc, index: int) -> int:
    device.write(0, 1, index)
    return device.read(1, 1)


def set_register(device: rtc.CmosRtc, index: int, value: int) -> None:
    device.write(0, 1, index)
    device.write(1, 1, value)


def time_registers(device: rtc.CmosRtc) -> list[int]:
    return [register(device, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)]


def test_rtc_reads_the_host_time_in_bcd_24_hour_by_default() -> None:
    device = rtc.CmosRtc(Clock())
    assert register(device, rtc.STATUS_B) == rtc.B_24_HOUR
    # sec min hour wday(Thursday = 5) mday mon year century, all BCD
    assert time_registers(device) == [0x09, 0x05, 0x14, 0x05, 0x03, 0x12, 0x26, 0x20]


def test_rtc_binary_mode_and_12_hour_mode_follow_status_b() -> None:
    device = rtc.CmosRtc(Clock())
    set_register(device, rtc.STATUS_B, rtc.B_24_HOUR | rtc.B_BINARY)
    assert time_registers(device) == [9, 5, 14, 5, 3, 12, 26, 20]
    set_register(device, rtc.STATUS_B, 0)  # BCD, 12-hour: 2 PM
    assert register(device, rtc.HOURS) == 0x80 | 0x02
    set_register(device, rtc.STATUS_B, rtc.B_BINARY)  # binary, 12-hour
    assert register(device, rtc.HOURS) == 0x80 | 2


@pytest.mark.parametrize(
    ("hour", "twelve_hour_bcd"), [(0, 0x12), (1, 0x01), (11, 0x11), (12, 0x92), (23, 0x91)]
)
def test_rtc_12_hour_encoding_of_midnight_and_noon(hour: int, twelve_hour_bcd: int) -> None:
    clock = Clock(calendar.timegm((2026, 1, 1, hour, 0, 0)))
    device = rtc.CmosRtc(clock)
    set_register(device, rtc.STATUS_B, 0)
    assert register(device, rtc.HOURS) == twelve_hour_bcd


def test_rtc_update_in_progress_only_in_the_last_244_us_of_a_second() -> None:
    clock = Clock(T0)
    device = rtc.CmosRtc(clock)
    assert register(device, rtc.STATUS_A) & rtc.A_UIP == 0
    clock.now = int(T0) + 1 - 100e-6
    assert register(device, rtc.STATUS_A) & rtc.A_UIP
    clock.now = int(T0) + 1 + 100e-6
    assert register(device, rtc.STATUS_A) & rtc.A_UIP == 0
    assert register(device, rtc.STATUS_D) == rtc.D_VRT


def test_rtc_keeps_ticking_from_a_time_the_guest_set() -> None:
    clock = Clock(T0)
    device = rtc.CmosRtc(clock)
    set_register(device, rtc.STATUS_B, rtc.B_24_HOUR | rtc.B_SET)
    set_register(device, rtc.YEAR, 0x99)
    set_register(device, rtc.HOURS, 0x23)
    clock.now += 5  # the clock stands still while SET is on
    assert register(device, rtc.SECONDS) == 0x09
    set_register(device, rtc.STATUS_B, rtc.B_24_HOUR)
    assert time_registers(device)[:3] == [0x09, 0x05, 0x23]
    assert register(device, rtc.YEAR) == 0x99
    clock.now += 61
    assert time_registers(device)[:3] == [0x10, 0x06, 0x23]


@pytest.mark.parametrize("year", [1, 1900, 1969, 1970, 1999, 2000, 2024, 2026, 2100, 2400, 9999])
def test_rtc_calendar_arithmetic_agrees_with_the_calendar_module(year: int) -> None:
    for month in range(1, 13):
        assert rtc.days_in_month(year, month) == calendar.monthrange(year, month)[1]
        for day in (1, 15, rtc.days_in_month(year, month)):
            moment = (year, month, day, 23, 59, 58)
            assert rtc.seconds_since_epoch(*moment) == calendar.timegm(moment), moment


def test_rtc_status_c_reports_updates_once_and_ram_bytes_are_kept() -> None:
    clock = Clock(T0)
    device = rtc.CmosRtc(clock)
    assert register(device, rtc.STATUS_C) == 0
    clock.now += 1
    set_register(device, rtc.STATUS_B, rtc.B_24_HOUR | rtc.B_UIE)
    # The periodic flag (rate 1024 Hz by default) is set whether or not PIE is.
    assert register(device, rtc.STATUS_C) == rtc.C_IRQF | rtc.C_PF | rtc.C_UF
    assert register(device, rtc.STATUS_C) == 0  # reading clears it
    set_register(device, 0x40, 0xA5)
    assert register(device, 0x40) == 0xA5


def test_rtc_index_port_keeps_the_nmi_mask_bit() -> None:
    device = rtc.CmosRtc(Clock())
    device.write(0, 1, 0x80 | rtc.SECONDS)
    assert device.nmi_masked
    assert device.read(1, 1) == 0x09
    device.write(0, 1, rtc.SECONDS)
    assert not device.nmi_masked


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes, /) -> int:
        self.data += data
        return len(data)


def _uart() -> tuple[serial.Serial, Sink, list[int]]:
    sink = Sink()
    irqs: list[int] = []
    return serial.Serial(sink, lambda: irqs.append(1)), sink, irqs


def test_serial_received_bytes_set_data_ready_and_read_in_order() -> None:
    uart, _, _ = _uart()
    assert uart.read(serial.LSR, 1) & serial.LSR_DATA_READY == 0
    assert uart.receive(b"ok\n") == 3
    assert uart.read(serial.LSR, 1) & serial.LSR_DATA_READY
    assert bytes(uart.read(serial.DATA, 1) for _ in range(3)) == b"ok\n"
    assert uart.read(serial.LSR, 1) & serial.LSR_DATA_READY == 0
    assert uart.bytes_received == 3


def test_serial_raises_its_irq_for_input_only_when_enabled() -> None:
    uart, _, irqs = _uart()
    uart.receive(b"a")
    assert irqs == []  # IER clear: the guest polls
    uart.write(serial.IER, 1, serial.IER_RECEIVED_DATA)
    assert irqs == [1]  # enabling with data waiting interrupts at once
    assert uart.read(serial.IIR_FCR, 1) & 0x0F == serial.IIR_RECEIVED_DATA
    uart.read(serial.DATA, 1)
    assert uart.read(serial.IIR_FCR, 1) & 0x0F == serial.IIR_NO_INTERRUPT
    uart.receive(b"b")
    assert irqs == [1, 1]


def test_serial_receive_data_outranks_transmit_empty() -> None:
    uart, sink, _ = _uart()
    uart.write(serial.IER, 1, serial.IER_RECEIVED_DATA | serial.IER_THRE)
    uart.receive(b"x")
    assert uart.read(serial.IIR_FCR, 1) & 0x0F == serial.IIR_RECEIVED_DATA
    uart.read(serial.DATA, 1)
    assert uart.read(serial.IIR_FCR, 1) & 0x0F == serial.IIR_THRE
    assert uart.read(serial.IIR_FCR, 1) & 0x0F == serial.IIR_NO_INTERRUPT
    uart.write(serial.DATA, 1, ord("y"))
    assert sink.data == b"y"


def test_serial_input_queue_is_bounded_and_a_writer_waits_for_room() -> None:
    uart, _, _ = _uart()
    assert uart.receive(bytes(serial.RECEIVE_CAPACITY + 10)) == serial.RECEIVE_CAPACITY
    assert uart.receive(b"more") == 0
    assert not uart.wait_for_room(0.01)
    reader = threading.Timer(0.05, lambda: uart.read(serial.DATA, 1))
    reader.start()
    assert uart.wait_for_room(5)
    reader.join()
    assert uart.receive(b"zz") == 1


def test_serial_loopback_returns_what_is_sent_and_fifo_reset_clears_input() -> None:
    uart, sink, _ = _uart()
    uart.write(serial.MCR, 1, serial.MCR_LOOPBACK)
    uart.write(serial.DATA, 1, 0x42)
    assert sink.data == b""
    assert uart.read(serial.DATA, 1) == 0x42
    uart.receive(b"abc")
    uart.write(serial.IIR_FCR, 1, serial.FCR_FIFO_ENABLE | serial.FCR_CLEAR_RECEIVER)
    assert uart.pending_input == 0


def test_unclaimed_ports_read_as_zero_as_firecracker_answers() -> None:
    bus = PortBus()
    assert bus.read(0x71, 1) == 0
    assert bus.read(0x2F8, 4) == 0
    bus.write(0x80, 1, 0xFF)  # ignored
    assert bus.unclaimed_accesses == 3


def test_bus_refuses_overlapping_devices() -> None:
    bus = PortBus()
    bus.register(0x70, 2, rtc.CmosRtc())
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x71, 1, rtc.CmosRtc())
