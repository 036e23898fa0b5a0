"""The CMOS real-time clock (a Motorola MC146818, as on every PC) at ports 0x70/0x71.

Firecracker gives x86 guests no wall clock; dksm gives them the host's.  The guest
writes a register index to port 0x70 (bit 7 of that byte masks NMIs, the other seven
select one of 128 CMOS bytes) and reads or writes the register at port 0x71.

What a guest sees:

- Time and date (seconds, minutes, hours, day of week, day of month, month, year,
  century at 0x32) are the host's UTC time plus an offset the guest may change by
  writing them.  Status register B decides their format, as the chip does: BCD or
  binary (bit 2, DM) and 24- or 12-hour (bit 1; in 12-hour mode bit 7 of the hour
  means PM).  While B's SET bit is on the registers stand still and take the guest's
  writes; clearing it starts the clock from what was written.
- Status register A's update-in-progress bit (UIP, bit 7) is on for the last 244 µs of
  every second, as the chip raises it before each update, so a guest that waits for
  it to clear (Unikraft, Linux) never waits long and never reads a torn time.
- Status register C reports the update-ended (UF) and periodic (PF) flags that became
  due since it was last read, and is cleared by reading it.  Status register D says
  the time is valid (VRT).
- The other bytes are battery-backed RAM: kept, zero at start.

Left out: the clock raises no interrupt (IRQ 8) and the alarm registers never fire;
guests that poll the RTC (all we know of on Firecracker) need neither.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

INDEX_PORT = 0x70
PORT_COUNT = 2  # 0x70 index, 0x71 data
NMI_MASK = 0x80
INDEX_MASK = 0x7F
CMOS_SIZE = 128

# Register indices.
SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
STATUS_A = 0x0A
STATUS_B = 0x0B
STATUS_C = 0x0C
STATUS_D = 0x0D
CENTURY = 0x32  # where the PC's BIOS (and ACPI's default FADT) keeps it

TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

A_UIP = 0x80
A_DIVIDER_32KHZ = 0x20  # DV2..0 = 010: the oscillator runs at 32.768 kHz
A_RATE_1024HZ = 0x06
A_WRITABLE = 0x7F
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_BINARY = 0x04
B_24_HOUR = 0x02
C_IRQF = 0x80
C_PF = 0x40
C_UF = 0x10
D_VRT = 0x80
HOUR_PM = 0x80

# The chip raises UIP this long before each once-a-second update.
UPDATE_WARNING_S = 244e-6
OSCILLATOR_HZ = 32768


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


def periodic_interval(rate_select: int) -> float | None:
    """Seconds between periodic flags for status A's rate bits (None: off).

    Rates 1 and 2 are the chip's exceptions (they repeat rates 8 and 9)."""
    if rate_select == 0:
        return None
    if rate_select < 3:
        rate_select += 7
    return (1 << (rate_select - 1)) / OSCILLATOR_HZ


class CmosRtc:
    """The RTC and CMOS RAM behind ports 0x70/0x71; ``clock`` gives UTC seconds."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[STATUS_A] = A_DIVIDER_32KHZ | A_RATE_1024HZ
        self._cmos[STATUS_B] = B_24_HOUR
        self._index = 0
        self.nmi_masked = False
        self._offset = 0.0  # guest time minus host time, set by the guest's writes
        self._held: dict[int, int] | None = None  # the fields while SET is on
        self._flags_since = clock()

    # -- the port interface ------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0:
                return self._index | (NMI_MASK if self.nmi_masked else 0)
            return self._read_register(self._index)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == 0:
                self._index = value & INDEX_MASK
                self.nmi_masked = bool(value & NMI_MASK)
            else:
                self._write_register(self._index, value)

    # -- registers -----------------------------------------------------------

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS:
            return self._encode(index, self._fields()[index])
        if index == STATUS_A:
            now = self._guest_time()
            updating = self._held is None and now % 1.0 >= 1.0 - UPDATE_WARNING_S
            return (self._cmos[STATUS_A] & A_WRITABLE) | (A_UIP if updating else 0)
        if index == STATUS_C:
            return self._take_flags()
        if index == STATUS_D:
            return D_VRT
        return self._cmos[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            fields = self._fields()
            fields[index] = self._decode(index, value)
            if self._held is not None:
                self._held = fields
            else:
                self._set_time(fields)
        elif index == STATUS_A:
            self._cmos[STATUS_A] = value & A_WRITABLE
        elif index == STATUS_B:
            self._write_status_b(value)
        elif index in (STATUS_C, STATUS_D):
            pass  # read-only
        else:
            self._cmos[index] = value

    def _write_status_b(self, value: int) -> None:
        was_set = bool(self._cmos[STATUS_B] & B_SET)
        if value & B_SET and not was_set:
            self._held = self._fields()
        elif was_set and not value & B_SET and self._held is not None:
            held, self._held = self._held, None
            self._set_time(held)
        self._cmos[STATUS_B] = value

    # -- time ----------------------------------------------------------------

    def _guest_time(self) -> float:
        return self._clock() + self._offset

    def _fields(self) -> dict[int, int]:
        """The time registers' values (binary, 24-hour) at this instant."""
        if self._held is not None:
            return dict(self._held)
        t = time.gmtime(int(self._guest_time()))
        return {
            SECONDS: t.tm_sec,
            MINUTES: t.tm_min,
            HOURS: t.tm_hour,
            DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,  # the chip counts Sunday = 1
            DAY_OF_MONTH: t.tm_mday,
            MONTH: t.tm_mon,
            YEAR: t.tm_year % 100,
            CENTURY: t.tm_year // 100,
        }

    def _set_time(self, fields: dict[int, int]) -> None:
        """Make the clock show ``fields`` now (the guest set it)."""
        year = fields[CENTURY] * 100 + fields[YEAR]
        month = min(max(fields[MONTH], 1), 12)
        day = min(max(fields[DAY_OF_MONTH], 1), days_in_month(year, month))
        seconds = seconds_since_epoch(
            year, month, day, fields[HOURS] % 24, fields[MINUTES] % 60, fields[SECONDS] % 60
        )
        now = self._clock()
        # Keep the fraction of the running second, so the next tick comes on time.
        self._offset = seconds + (now + self._offset) % 1.0 - now

    def _encode(self, index: int, value: int) -> int:
        mode = self._cmos[STATUS_B]
        pm = 0
        if index == HOURS and not mode & B_24_HOUR:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        encoded = value if mode & B_BINARY else _to_bcd(value)
        return encoded | pm

    def _decode(self, index: int, raw: int) -> int:
        mode = self._cmos[STATUS_B]
        pm = False
        if index == HOURS and not mode & B_24_HOUR:
            pm = bool(raw & HOUR_PM)
            raw &= ~HOUR_PM
        value = raw if mode & B_BINARY else _from_bcd(raw)
        if index == HOURS and not mode & B_24_HOUR:
            value = value % 12 + (12 if pm else 0)
        return value

    def _take_flags(self) -> int:
        """Status C: what became due since the last read, then cleared."""
        now = self._clock()
        since, self._flags_since = self._flags_since, now
        flags = 0
        if self._held is None and int(now + self._offset) != int(since + self._offset):
            flags |= C_UF
        interval = periodic_interval(self._cmos[STATUS_A] & 0x0F)
        if interval is not None and int(now / interval) != int(since / interval):
            flags |= C_PF
        enabled = self._cmos[STATUS_B]
        if (flags & C_UF and enabled & B_UIE) or (flags & C_PF and enabled & B_PIE):
            flags |= C_IRQF
        return flags


# The Gregorian calendar's arithmetic, for the time a guest sets.  Not the calendar
# module's: it imports datetime, about 1.5 ms of every VM start for a write most
# guests never make (and a confined VMM cannot import it later).
_DAYS_BEFORE_MONTH = (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)


def is_leap_year(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def days_in_month(year: int, month: int) -> int:
    """Days in ``month`` (1-12) of ``year``."""
    if month == 2:
        return 29 if is_leap_year(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _leap_years_before(year: int) -> int:
    """Leap years from year 1 up to, not including, ``year``."""
    y = year - 1
    return y // 4 - y // 100 + y // 400


def seconds_since_epoch(
    year: int, month: int, day: int, hour: int, minute: int, second: int
) -> int:
    """The UTC date and time as seconds since 1970-01-01 00:00:00 (POSIX time)."""
    days = 365 * (year - 1970) + _leap_years_before(year) - _leap_years_before(1970)
    days += _DAYS_BEFORE_MONTH[month - 1] + (month > 2 and is_leap_year(year)) + day - 1
    return ((days * 24 + hour) * 60 + minute) * 60 + second
