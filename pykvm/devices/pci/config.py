"""A PCI function's 256-byte configuration space (type 0 header).

Every byte has a write mask: bits outside it keep their value whatever the
guest writes (read-only registers, the BARs' size bits), and the status
register's error bits are write-one-to-clear. BAR sizing then needs no special
case: the address bits of a BAR of size 2^n are exactly the writable ones, so
writing all ones reads back the size mask, as the PCI spec requires.

Capabilities are appended to the list that starts at 0x34, each with its own
write mask and an optional hook that sees every write to it (MSI-X uses one to
follow its Enable and Function Mask bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...errors import ConfigError
from ...snapshot.schema import blob
from ...snapshot.state import ComponentState, SnapshotError

CONFIG_SIZE = 256

# --- type 0 header offsets -------------------------------------------------------
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09        # 3 bytes: programming interface, subclass, class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40

# --- COMMAND bits ----------------------------------------------------------------
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_PARITY \
    | COMMAND_SERR | COMMAND_INTX_DISABLE

# --- STATUS bits -----------------------------------------------------------------
STATUS_INTERRUPT = 1 << 3          # INTx asserted (read-only, kept by the device)
STATUS_CAPABILITIES = 1 << 4
STATUS_ERRORS_W1C = 0xF900         # parity, signalled/received aborts, SERR: write 1 to clear

# --- BAR low bits ----------------------------------------------------------------
BAR_MEM_TYPE_64 = 0x4
BAR_PREFETCHABLE = 0x8
MIN_BAR_SIZE = 16

INTX_PIN_A = 1


@dataclass
class Bar:
    """A memory BAR: ``size`` is a power of two; a 64-bit BAR also owns slot index+1."""

    index: int
    size: int
    is_64bit: bool = False
    prefetchable: bool = False

    @property
    def flags(self) -> int:
        return (BAR_MEM_TYPE_64 if self.is_64bit else 0) | (BAR_PREFETCHABLE if self.prefetchable else 0)


@dataclass
class _Capability:
    offset: int
    length: int
    hook: Callable[[int, int], None] | None   # (offset within the capability, size)


@dataclass(frozen=True)
class ConfigSpaceState(ComponentState, tag="pci-config"):
    """The 256 bytes are the state: BARs, command, MSI-X control (masks and
    capabilities follow from the device)."""

    data: blob(CONFIG_SIZE, exact=True)


class ConfigSpace:
    """Config space bytes plus per-bit write masks. Not thread-safe by itself:
    the PCI bus serializes config accesses."""

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 0):
        self.data = bytearray(CONFIG_SIZE)
        self.writable = bytearray(CONFIG_SIZE)
        self.write_one_to_clear = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * BAR_COUNT
        self._capabilities: list[_Capability] = []
        self._next_capability = FIRST_CAPABILITY
        self.set(VENDOR_ID, 2, vendor_id)
        self.set(DEVICE_ID, 2, device_id)
        self.set(REVISION_ID, 1, revision)
        self.set(CLASS_CODE, 3, class_code)
        self.set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.set(SUBSYSTEM_ID, 2, subsystem_id)
        self.set(INTERRUPT_PIN, 1, interrupt_pin)
        self.set_writable(COMMAND, 2, COMMAND_WRITABLE)
        self.write_one_to_clear[STATUS:STATUS + 2] = STATUS_ERRORS_W1C.to_bytes(2, "little")
        self.set_writable(CACHE_LINE_SIZE, 1, 0xFF)
        self.set_writable(LATENCY_TIMER, 1, 0xFF)
        self.set_writable(INTERRUPT_LINE, 1, 0xFF)

    # --- the device's side: raw access, ignoring masks ---------------------------------
    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        self.writable[offset:offset + size] = mask.to_bytes(size, "little")

    @property
    def command(self) -> int:
        return self.get(COMMAND, 2)

    def set_status_bit(self, bit: int, on: bool) -> None:
        status = self.get(STATUS, 2)
        self.set(STATUS, 2, status | bit if on else status & ~bit)

    # --- snapshots --------------------------------------------------------------------------
    def save_state(self) -> ConfigSpaceState:
        return ConfigSpaceState(bytes(self.data))

    def restore_state(self, state: ConfigSpaceState) -> None:
        if state.data[:4] != self.data[:4]:
            raise SnapshotError(f"PCI config space of device {state.data[2:4][::-1].hex()} "
                                f"given to {self.data[2:4][::-1].hex()}")
        self.data[:] = state.data

    # --- the guest's side --------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > CONFIG_SIZE:
            return (1 << 8 * size) - 1
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > CONFIG_SIZE:
            return
        for i in range(size):
            byte = (value >> 8 * i) & 0xFF
            at = offset + i
            mask = self.writable[at]
            current = self.data[at] & ~(byte & self.write_one_to_clear[at])
            self.data[at] = (current & ~mask | byte & mask) & 0xFF
        for capability in self._capabilities:
            if capability.hook is not None and offset < capability.offset + capability.length \
                    and capability.offset < offset + size:
                capability.hook(offset - capability.offset, size)

    # --- BARs --------------------------------------------------------------------------
    def add_bar(self, bar: Bar) -> None:
        if bar.size < MIN_BAR_SIZE or bar.size & (bar.size - 1):
            raise ConfigError(f"BAR {bar.index}: size {bar.size:#x} is not a power of two >= 16")
        last = bar.index + (1 if bar.is_64bit else 0)
        if not 0 <= bar.index or last >= BAR_COUNT or any(self.bars[bar.index:last + 1]):
            raise ConfigError(f"BAR {bar.index} is taken or out of range")
        self.bars[bar.index] = bar
        offset = BAR0 + 4 * bar.index
        address_mask = ~(bar.size - 1) & ((1 << 64) - 1 if bar.is_64bit else 0xFFFFFFFF)
        self.set(offset, 4, bar.flags)
        self.set_writable(offset, 4, address_mask & 0xFFFFFFF0)
        if bar.is_64bit:
            self.bars[bar.index + 1] = bar
            self.set_writable(offset + 4, 4, address_mask >> 32)

    def bar_address(self, bar: Bar) -> int:
        offset = BAR0 + 4 * bar.index
        address = self.get(offset, 4) & ~0xF
        if bar.is_64bit:
            address |= self.get(offset + 4, 4) << 32
        return address

    def set_bar_address(self, bar: Bar, address: int) -> None:
        """Firmware's job: place the BAR (pykvm pre-assigns BARs, as a BIOS would)."""
        offset = BAR0 + 4 * bar.index
        self.set(offset, 4, (address & 0xFFFFFFF0) | bar.flags)
        if bar.is_64bit:
            self.set(offset + 4, 4, address >> 32)

    @staticmethod
    def touches_bars(offset: int, size: int) -> bool:
        return offset < BAR0 + 4 * BAR_COUNT and BAR0 < offset + size

    @staticmethod
    def touches_command(offset: int, size: int) -> bool:
        return offset < COMMAND + 2 and COMMAND < offset + size

    # --- capabilities --------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None,
                       hook: Callable[[int, int], None] | None = None) -> int:
        """Append a capability (``body`` follows the 2-byte id/next header); returns its offset."""
        length = 2 + len(body)
        offset = self._next_capability
        if offset + length > CONFIG_SIZE:
            raise ConfigError(f"no room for capability {cap_id:#x} in config space")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2:offset + length] = body
        if writable is not None:
            if len(writable) != len(body):
                raise ConfigError("capability write mask and body differ in length")
            self.writable[offset + 2:offset + length] = writable
        if self._capabilities:
            self.data[self._capabilities[-1].offset + 1] = offset
        else:
            self.set(CAPABILITIES_POINTER, 1, offset)
            self.set_status_bit(STATUS_CAPABILITIES, True)
        self._capabilities.append(_Capability(offset, length, hook))
        self._next_capability = (offset + length + 3) & ~3
        return offset

    def capability_offsets(self) -> list[tuple[int, int]]:
        """(id, offset) of each capability, walking the list as a guest would (bounded)."""
        found = []
        offset = self.get(CAPABILITIES_POINTER, 1) & ~3
        while offset and len(found) < 48:
            found.append((self.data[offset], offset))
            offset = self.data[offset + 1] & ~3
        return found
