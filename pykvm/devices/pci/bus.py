"""PCI bus 0: a host bridge, configuration mechanism #1, and BAR placement.

Configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2): a 32-bit write to
port 0xCF8 selects (enable bit 31, bus 23:16, device 15:11, function 10:8,
register 7:2); ports 0xCFC-0xCFF then reach that dword of config space at any
width. Only 32-bit accesses to 0xCF8 are the address register; Linux's probe
writes a byte to 0xCFB and checks that the dword at 0xCF8 did not change.

pykvm plays firmware: every BAR is assigned an address in the PCI MMIO window
and memory decoding is enabled before the guest starts, so a guest keeps them
as they are. A guest may still move a BAR or switch decoding off (Linux does
while it sizes BARs); the bus then unmaps and remaps the BAR on the VM's MMIO
bus and tells the device, which moves its ioeventfds.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ... import layout
from ...bus import Device
from ...errors import ConfigError, PykvmError
from ...snapshot.schema import U32
from ...snapshot.state import ComponentState, SnapshotError, Stateful, restore_part
from ...interrupts import SharedLevelLine
from .config import (COMMAND, COMMAND_MEMORY, INTERRUPT_LINE, INTERRUPT_PIN, INTX_PIN_A,
                     ConfigSpace, ConfigSpaceState)
from .device import PciDevice

logger = logging.getLogger(__name__)

SLOTS = layout.PCI_SLOTS
CONFIG_ENABLE = 1 << 31
HOST_BRIDGE_CLASS = 0x060000
# Red Hat's PCI IDs, which QEMU and others use for virtual hardware.
PCI_VENDOR_REDHAT = 0x1B36
PCI_DEVICE_HOST_BRIDGE = 0x0008


@dataclass(frozen=True)
class PciSlotState:
    name: str                               # the function's name: the same one must be there
    config: ConfigSpaceState
    device: ComponentState | None           # what the function itself keeps (virtio: its transport)


@dataclass(frozen=True)
class PciBusState(ComponentState, tag="pci-bus"):
    """conf1's address register, and per slot the config space and the function's state."""

    conf1_address: U32
    slots: dict[str, PciSlotState]


class HostBridge(PciDevice):
    """Device 00.0. Linux's conf1 sanity check looks for a host bridge (class 06 00)."""

    name = "pci-host-bridge"

    def __init__(self):
        super().__init__(ConfigSpace(vendor_id=PCI_VENDOR_REDHAT, device_id=PCI_DEVICE_HOST_BRIDGE,
                                     class_code=HOST_BRIDGE_CLASS))


class BarAllocator:
    """Hands out naturally aligned ranges of the 32-bit PCI MMIO window."""

    def __init__(self, start: int = layout.PCI_MMIO_START, size: int = layout.PCI_MMIO_SIZE):
        self.start, self.end = start, start + size
        self.next = start

    def allocate(self, size: int) -> int:
        address = (self.next + size - 1) & ~(size - 1)
        if address + size > self.end:
            raise ConfigError(f"PCI MMIO window full: no room for a BAR of {size:#x} bytes")
        self.next = address + size
        return address


class PciBus:
    """Bus 0 of one VM. :meth:`add` places a function in the next free slot."""

    def __init__(self, vm):
        self.vm = vm
        self.slots: list[PciDevice | None] = [None] * SLOTS
        self._mapped: dict[tuple[int, int], int] = {}   # (slot, BAR index) -> address
        self._lock = threading.RLock()
        self._intx_lines: dict[int, SharedLevelLine] = {}
        self.allocator = BarAllocator()
        self.config_access = ConfigMechanism1(self)
        vm.add_pio_device(layout.PCI_CONFIG_ADDRESS_PORT, 8, self.config_access)
        self.add(HostBridge())
        vm.on_close(self.close)

    # --- placing devices -----------------------------------------------------------------
    def add(self, device: PciDevice) -> int:
        with self._lock:
            try:
                slot = self.slots.index(None)
            except ValueError:
                raise ConfigError(f"PCI bus 0 is full ({SLOTS} slots)") from None
            self.slots[slot] = device
            config = device.config
            seen = set()
            for bar in config.bars:
                if bar is None or id(bar) in seen:
                    continue
                seen.add(id(bar))
                config.set_bar_address(bar, self.allocator.allocate(max(bar.size, layout.PAGE_SIZE)))
            if config.get(INTERRUPT_PIN, 1) == INTX_PIN_A:
                gsi = layout.PCI_INTX_GSI_BY_SLOT[slot]   # what the DSDT's _PRT says
                config.set(INTERRUPT_LINE, 1, gsi)
                if gsi not in self._intx_lines:
                    self._intx_lines[gsi] = SharedLevelLine(self.vm.irq_line(gsi))
                device.intx = self._intx_lines[gsi].source()
            if any(config.bars):
                config.set(COMMAND, 2, config.command | COMMAND_MEMORY)
            self._update_mappings(slot)
            return slot

    def devices(self) -> list[tuple[int, PciDevice]]:
        return [(slot, device) for slot, device in enumerate(self.slots) if device is not None]

    # --- config space access (from the conf1 ports, on vCPU threads) -------------------------
    def config_read(self, slot: int, function: int, offset: int, size: int) -> int:
        device = self.slots[slot] if function == 0 else None
        if device is None:
            return (1 << 8 * size) - 1   # no device: all ones, which is how a probe knows
        with self._lock:
            return device.config.read(offset, size)

    def config_write(self, slot: int, function: int, offset: int, size: int, value: int) -> None:
        device = self.slots[slot] if function == 0 else None
        if device is None:
            return
        with self._lock:
            config = device.config
            config.write(offset, size, value)
            if config.touches_bars(offset, size) or config.touches_command(offset, size):
                self._update_mappings(slot)
            device.config_written(offset, size)

    # --- BAR mappings -----------------------------------------------------------------------
    def _update_mappings(self, slot: int) -> None:
        """Make the MMIO bus match the device's BARs and its memory-decode bit."""
        device = self.slots[slot]
        config = device.config
        decoding = bool(config.command & COMMAND_MEMORY)
        for index, handler in device.bar_devices.items():
            bar = config.bars[index]
            wanted = config.bar_address(bar) if decoding else None
            if wanted is not None and not self._placeable(wanted, bar.size):
                wanted = None
            current = self._mapped.get((slot, index))
            if current == wanted:
                continue
            if current is not None:
                self.vm.mmio_bus.unregister(current)
                del self._mapped[(slot, index)]
                device.bar_unmapped(index, current)
            if wanted is not None:
                try:
                    self.vm.add_mmio_device(wanted, bar.size, handler)
                except PykvmError as error:
                    logger.warning("%s: BAR %d at %#x not mapped: %s", device.name, index,
                                   wanted, error)
                    continue
                self._mapped[(slot, index)] = wanted
                device.bar_mapped(index, wanted)

    def _placeable(self, address: int, size: int) -> bool:
        # 0 is "unassigned"; the all-ones sizing pattern lands in the top page, where
        # the LAPIC and IOAPIC live: neither is a place to decode a BAR.
        return (address != 0 and address + size <= layout.IOAPIC_ADDR) or address >= layout.FOUR_GiB

    def bar_address(self, slot: int, index: int) -> int | None:
        """Where BAR ``index`` of the device in ``slot`` decodes now, or None."""
        return self._mapped.get((slot, index))

    # --- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> PciBusState:
        with self._lock:
            slots = {str(slot): PciSlotState(
                device.name, device.config.save_state(),
                device.save_state() if isinstance(device, Stateful) else None)
                for slot, device in self.devices()}
            return PciBusState(self.config_access.address, slots)

    def restore_state(self, state: PciBusState) -> None:
        """Onto a bus built from the same configuration: the same functions in the same
        slots. BARs the guest moved are mapped where it put them."""
        with self._lock:
            saved = state.slots
            present = {str(slot): device for slot, device in self.devices()}
            if set(saved) != set(present):
                raise SnapshotError(f"PCI slots {sorted(k[:8] for k in saved)[:8]} saved, "
                                    f"{sorted(present)} present")
            self.config_access.address = state.conf1_address & 0x80FFFFFC
            for key, device in present.items():
                if saved[key].name != device.name:
                    raise SnapshotError(f"PCI slot {key}: {saved[key].name[:40]} saved, "
                                        f"{device.name} present")
                device.config.restore_state(saved[key].config)
                self._update_mappings(int(key))
            for key, device in present.items():
                if saved[key].device is not None:
                    restore_part(device, saved[key].device, f"pci.slots.{key}.device")

    def close(self) -> None:
        with self._lock:
            for slot, device in self.devices():
                for index in list(device.bar_devices):
                    address = self._mapped.pop((slot, index), None)
                    if address is not None:
                        self.vm.mmio_bus.unregister(address)
                        device.bar_unmapped(index, address)
                device.close()


class ConfigMechanism1(Device):
    """Ports 0xCF8-0xCFF: the address register and the data window."""

    name = "pci-conf1"

    def __init__(self, bus: PciBus):
        self.bus = bus
        self.address = 0

    def _target(self) -> tuple[int, int, int] | None:
        address = self.address
        if not address & CONFIG_ENABLE or (address >> 16) & 0xFF != 0:
            return None   # disabled, or a bus other than 0: nobody answers
        return (address >> 11) & 0x1F, (address >> 8) & 0x7, address & 0xFC

    def read(self, offset: int, size: int) -> int:
        if offset < 4:
            return self.address if offset == 0 and size == 4 else (1 << 8 * size) - 1
        size = min(size, 8 - offset)
        target = self._target()
        if target is None:
            return (1 << 8 * size) - 1
        slot, function, register = target
        return self.bus.config_read(slot, function, register + offset - 4, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value & 0x80FFFFFC
            return
        size = min(size, 8 - offset)
        target = self._target()
        if target is not None:
            slot, function, register = target
            self.bus.config_write(slot, function, register + offset - 4, size,
                                  value & ((1 << 8 * size) - 1))
