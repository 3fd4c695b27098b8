"""The CMOS real-time clock (MC146818): the guest's wall clock at boot.

Registered at port 0x70 for 2 ports: offset 0 (0x70) selects a CMOS register
(bit 7 masks NMIs; remembered, since pykvm has no NMI source to mask), offset
1 (0x71) reads or writes it.

The clock is the host's UTC time plus an offset that moves when the guest
sets the time (``hwclock --systohc``): field by field, or, as Linux does,
between raising and clearing register B's SET bit, during which the time
registers hold still. Registers are BCD or binary per register B's DM bit and
24- or 12-hour per its 24/12 bit (default 0x02: 24-hour, BCD). Register A
never shows an update in progress (UIP), so readers need not wait; register D
says the RAM and time are valid. The century is register 0x32. The other CMOS
bytes (0x0E-0x7F, 114 bytes) are plain RAM, as are the three alarm registers.

Not modelled: the periodic, alarm and update-ended interrupts (there is no
IRQ 8 and register C always reads 0), daylight saving, and the divider chain.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Callable

from .. import layout
from ..bus import Device
from ..snapshot.schema import U64, Bounds, blob
from ..snapshot.state import ComponentState, SnapshotError

PORT_BASE = layout.RTC_BASE     # 0x70 (pykvm/layout.py owns the ports)
PORT_COUNT = layout.RTC_LEN
INDEX = 0
DATA = 1

NMI_DISABLE = 0x80
INDEX_MASK = 0x7F
CMOS_SIZE = 128

# --- registers ---------------------------------------------------------------------
SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
WEEKDAY = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32
FIRST_RAM_BYTE = 0x0E

REG_A_UIP = 0x80
DEFAULT_REG_A = 0x26        # 32.768 kHz time base, 1024 Hz rate: what a BIOS programs
REG_B_SET = 0x80
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
DEFAULT_REG_B = REG_B_24H
REG_D_VRT = 0x80
HOUR_PM = 0x80              # 12-hour mode: bit 7 of the hours register

# Time register -> the field of the clock it shows.
TIME_FIELDS = {SECONDS: "second", MINUTES: "minute", HOURS: "hour",
               DAY_OF_MONTH: "day", MONTH: "month", YEAR: "year", CENTURY: "century"}


@dataclass(frozen=True)
class RtcState(ComponentState, tag="rtc"):
    """CMOS RAM, the selected register, and the guest's clock as an offset from the
    host's (so the restored clock keeps running with host time)."""
    index: Annotated[int, Bounds(0, INDEX_MASK)]
    cmos: blob(CMOS_SIZE, exact=True)
    offset: float                           # guest time - host time, seconds
    held: dict[str, U64] | None             # the time fields while SET is raised
    nmi_masked: bool

    def check(self) -> None:
        if self.held is not None and set(self.held) != set(TIME_FIELDS.values()):
            raise SnapshotError("rtc: held time fields incomplete")


class Rtc(Device):
    """CMOS RTC and RAM. ``clock`` returns host seconds since the epoch (tests pass a fake)."""

    name = "rtc"

    def __init__(self, *, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[REG_A] = DEFAULT_REG_A
        self._cmos[REG_B] = DEFAULT_REG_B
        self._offset = 0.0          # guest time - host time, in seconds
        self._held: dict[str, int] | None = None   # the time fields while SET is raised
        self.nmi_masked = False
        self.invalid_time_writes = 0

    def save_state(self) -> RtcState:
        with self._lock:
            return RtcState(self._index, bytes(self._cmos), self._offset,
                            dict(self._held) if self._held else None, self.nmi_masked)

    def restore_state(self, state: RtcState) -> None:
        with self._lock:
            self._index = state.index
            self._cmos = bytearray(state.cmos)
            self._offset = state.offset
            self._held = dict(state.held) if state.held else None
            self.nmi_masked = state.nmi_masked

    def read(self, offset: int, size: int) -> int:
        if offset != DATA:
            return (1 << (8 * size)) - 1   # the index port is write-only
        with self._lock:
            value = self._read_register(self._index)
        return value if size == 1 else value | ((1 << (8 * size)) - 0x100)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == INDEX:
                self._index = value & INDEX_MASK
                self.nmi_masked = bool(value & NMI_DISABLE)
            elif offset == DATA:
                self._write_register(self._index, value)

    # --- registers ---------------------------------------------------------------------

    def _read_register(self, index: int) -> int:
        if index in TIME_FIELDS or index == WEEKDAY:
            return self._encode_field(index, self._time_fields())
        if index == REG_A:
            return self._cmos[REG_A] & ~REG_A_UIP
        if index == REG_C:
            return 0        # no interrupt flags: none are generated
        if index == REG_D:
            return REG_D_VRT
        return self._cmos[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_FIELDS:
            fields = self._time_fields()
            fields[TIME_FIELDS[index]] = self._decode_field(index, value)
            if self._held is not None:
                self._held = fields
            else:
                self._set_time(fields)
        elif index == WEEKDAY:
            pass            # follows from the date; a written weekday is not kept
        elif index == REG_B:
            self._write_reg_b(value)
        elif index in (REG_C, REG_D):
            pass            # read-only
        elif index == REG_A:
            self._cmos[REG_A] = value & ~REG_A_UIP
        else:
            self._cmos[index] = value

    def _write_reg_b(self, value: int) -> None:
        raising_set = value & REG_B_SET and self._held is None
        clearing_set = not value & REG_B_SET and self._held is not None
        if raising_set:
            self._held = self._time_fields()        # the clock holds still while set
        elif clearing_set:
            held, self._held = self._held, None
            self._set_time(held)
        self._cmos[REG_B] = value

    # --- the clock ---------------------------------------------------------------------

    def _time_fields(self) -> dict[str, int]:
        if self._held is not None:
            return dict(self._held)
        try:
            now = datetime.fromtimestamp(int(self._clock() + self._offset), tz=timezone.utc)
        except (ValueError, OverflowError, OSError):
            # The guest's clock ran past year 9999: fall back to the host's time.
            self._offset = 0.0
            now = datetime.fromtimestamp(int(self._clock()), tz=timezone.utc)
        return {"second": now.second, "minute": now.minute, "hour": now.hour,
                "day": now.day, "month": now.month, "year": now.year % 100,
                "century": now.year // 100}

    def _set_time(self, fields: dict[str, int]) -> None:
        try:
            wanted = datetime(fields["century"] * 100 + fields["year"], fields["month"],
                              fields["day"], fields["hour"], fields["minute"],
                              fields["second"], tzinfo=timezone.utc)
        except ValueError:
            self.invalid_time_writes += 1    # e.g. 31 February, or bad BCD digits: ignored
            return
        self._offset = wanted.timestamp() - self._clock()

    @property
    def _binary(self) -> bool:
        return bool(self._cmos[REG_B] & REG_B_DM_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary else (value // 10) << 4 | value % 10

    def _decode(self, value: int) -> int:
        return value if self._binary else (value >> 4) * 10 + (value & 0x0F)

    def _encode_field(self, index: int, fields: dict[str, int]) -> int:
        if index == WEEKDAY:
            try:
                date = datetime(fields["century"] * 100 + fields["year"],
                                fields["month"], fields["day"])
                weekday = date.isoweekday() % 7 + 1   # the RTC counts Sunday = 1
            except ValueError:
                weekday = 1     # a half-written date while SET is raised
            return self._encode(weekday)
        value = fields[TIME_FIELDS[index]]
        if index == HOURS and not self._cmos[REG_B] & REG_B_24H:
            pm = value >= 12
            return self._encode(value % 12 or 12) | (HOUR_PM if pm else 0)
        return self._encode(value) & 0xFF

    def _decode_field(self, index: int, value: int) -> int:
        if index == HOURS and not self._cmos[REG_B] & REG_B_24H:
            hour = self._decode(value & ~HOUR_PM) % 12
            return hour + 12 if value & HOUR_PM else hour
        return self._decode(value)
