"""ACPI fixed hardware: the PM1a event and control registers the FADT names.

Registered at ``layout.ACPI_PM_BASE`` for ``layout.ACPI_PM_LEN`` ports:

    +0  PM1a_STS  (16 bits) status: write 1 to clear; WAK_STS (bit 15) is set on "wake"
    +2  PM1a_EN   (16 bits) enable: stored, nothing raises the SCI
    +4  PM1a_CNT  (16 bits) control: SCI_EN (bit 0) always reads 1 (ACPI mode, no SMI
                  hand-over); SLP_TYP (bits 12:10) and SLP_EN (bit 13, write-only)
    +6  unused (reads 0)

Writing SLP_EN with SLP_TYP equal to the DSDT's ``_S5_`` value (soft off) calls
``on_poweroff()``: that is how Linux's ``poweroff`` ends a VM that has ACPI.
Any other sleep type is not implemented and "wakes" at once (WAK_STS set), so a
guest that tries S1-S4 simply carries on. Accesses of any width at any offset
work byte by byte, so an OS may read the 32-bit event block in one go.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..boot.acpi import S5_SLP_TYP
from ..bus import Device
from ..snapshot.schema import U16
from ..snapshot.state import ComponentState

STS_OFFSET = 0
EN_OFFSET = 2
CNT_OFFSET = 4
REGISTER_BYTES = 6

WAK_STS = 1 << 15
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0b111 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
CNT_WRITE_ONLY = SLP_EN | (1 << 2)   # SLP_EN and GBL_RLS read as 0


@dataclass(frozen=True)
class AcpiPmState(ComponentState, tag="acpi-pm"):
    """PM1a status, enable and control as the guest left them."""
    status: U16
    enable: U16
    control: U16


class AcpiPm(Device):
    name = "acpi-pm"

    def __init__(self, on_poweroff: Callable[[], object], *, s5_slp_typ: int = S5_SLP_TYP):
        self._on_poweroff = on_poweroff
        self.s5_slp_typ = s5_slp_typ
        self.status = 0
        self.enable = 0
        self.control = SCI_EN
        self.sleeps: list[int] = []   # SLP_TYP of every sleep request, in order

    def save_state(self) -> AcpiPmState:
        return AcpiPmState(self.status, self.enable, self.control)

    def restore_state(self, state: AcpiPmState) -> None:
        self.status, self.enable = state.status, state.enable
        self.control = state.control & ~SLP_EN

    def _registers(self) -> bytes:
        control = (self.control | SCI_EN) & ~CNT_WRITE_ONLY
        return (self.status.to_bytes(2, "little") + self.enable.to_bytes(2, "little")
                + control.to_bytes(2, "little"))

    def read(self, offset: int, size: int) -> int:
        registers = self._registers()
        data = bytes(registers[i] if i < REGISTER_BYTES else 0
                     for i in range(offset, offset + size))
        return int.from_bytes(data, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, offset: int, byte: int) -> None:
        if offset in (STS_OFFSET, STS_OFFSET + 1):          # write 1 to clear
            self.status &= ~(byte << (8 * (offset - STS_OFFSET)))
        elif offset in (EN_OFFSET, EN_OFFSET + 1):
            shift = 8 * (offset - EN_OFFSET)
            self.enable = (self.enable & ~(0xFF << shift)) | (byte << shift)
        elif offset in (CNT_OFFSET, CNT_OFFSET + 1):
            shift = 8 * (offset - CNT_OFFSET)
            self.control = (self.control & ~(0xFF << shift)) | (byte << shift)
            if self.control & SLP_EN:   # SLP_TYP and SLP_EN share the high byte: one write
                self.control &= ~SLP_EN
                self._sleep((self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT)

    def _sleep(self, slp_typ: int) -> None:
        self.sleeps.append(slp_typ)
        if slp_typ == self.s5_slp_typ:
            self._on_poweroff()
        else:
            self.status |= WAK_STS    # not implemented: wake up at once
