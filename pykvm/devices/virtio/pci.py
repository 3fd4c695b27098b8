"""The virtio-pci modern transport (virtio 1.2, section 4.1) around a VirtioDevice.

One 32 KiB memory BAR holds every region the capabilities point at:

    0x0000  common configuration (features, status, queue registers)
    0x1000  ISR status (read to acknowledge; used only with INTx)
    0x2000  device-specific configuration
    0x3000  notify area: queue i's doorbell at 0x3000 + 4*i (notify_off_multiplier 4)
    0x4000  MSI-X table, 0x5000 its PBA (one vector per queue + one for config changes)

Doorbells are ioeventfds, so a notify never exits to Python (the MMIO handler
below only catches writes of an unusual width). Interrupts go out through
MSI-X irqfds; a driver that does not enable MSI-X gets INTx, a level-triggered
line into the IOAPIC (and PIC) that stays up until the ISR register is read.

What is not PCI -- status, features, the queues and their checks, the worker, the
hostile-driver rules -- is the transport-neutral :mod:`.transport`, shared with
virtio-mmio (mmio.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...bus import Device
from ...memory import GuestMemory
from ...snapshot.schema import U16
from ..pci.config import (COMMAND_INTX_DISABLE, INTX_PIN_A, STATUS_INTERRUPT, Bar,
                          ConfigSpace)
from ..pci.device import PciDevice, RegionMap
from ..pci.msix import NO_VECTOR, MsixState, MsixTable
from .device import VirtioDevice
from .state import VirtioTransportState
from .transport import INTERRUPT_CONFIG, INTERRUPT_QUEUE, Register, VirtioTransport, queue_value

PCI_VENDOR_VIRTIO = 0x1AF4
PCI_DEVICE_MODERN_BASE = 0x1040          # + virtio device ID: non-transitional devices
PCI_SUBSYSTEM_MODERN = 0x40              # "0x40 or higher" for non-transitional devices
PCI_CLASS = {2: 0x018000, 3: 0x078000, 4: 0xFF0000}   # storage, communication, other

# --- virtio PCI capabilities (cap_vndr 0x09) -----------------------------------------------
CAP_ID_VENDOR = 0x09
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE = 1, 2, 3, 4

# --- the BAR -------------------------------------------------------------------------------
BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x40
ISR_OFFSET, ISR_SIZE = 0x1000, 0x1000
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE = 0x3000, 0x1000
NOTIFY_MULTIPLIER = 4
NOTIFY_WIDTH = 2                          # drivers write the 16-bit queue index
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x4000, 0x5000

ISR_QUEUE = INTERRUPT_QUEUE
ISR_CONFIG = INTERRUPT_CONFIG

# Common configuration (4.1.4.3): what is not a field below (queue_notify_data,
# queue_reset at 0x38..0x3B) reads 0 and ignores writes.


@dataclass(frozen=True)
class VirtioPciState(VirtioTransportState, tag="virtio-pci"):
    """A virtio-pci function: the transport's state, the config vector, MSI-X."""

    config_msix_vector: U16
    msix: MsixState


class VirtioPciDevice(PciDevice, VirtioTransport):
    def __init__(self, vm, memory: GuestMemory, device: VirtioDevice, *,
                 interrupt_lines=None):
        num_queues = len(device.queue_sizes)
        config = ConfigSpace(vendor_id=PCI_VENDOR_VIRTIO,
                             device_id=PCI_DEVICE_MODERN_BASE + device.device_id,
                             class_code=PCI_CLASS.get(device.device_id, 0xFF0000), revision=1,
                             subsystem_vendor_id=PCI_VENDOR_VIRTIO,
                             subsystem_id=PCI_SUBSYSTEM_MODERN, interrupt_pin=INTX_PIN_A)
        PciDevice.__init__(self, config)
        self._notify_base: int | None = None
        self.config_msix_vector = NO_VECTOR
        self._init_transport(vm, memory, device)

        config.add_bar(Bar(BAR_INDEX, BAR_SIZE))
        for cfg_type, offset, length in ((CFG_COMMON, COMMON_OFFSET, COMMON_SIZE),
                                         (CFG_ISR, ISR_OFFSET, 1),
                                         (CFG_DEVICE, DEVICE_OFFSET,
                                          max(len(device.config_bytes()), 4)),
                                         (CFG_NOTIFY, NOTIFY_OFFSET,
                                          NOTIFY_MULTIPLIER * num_queues)):
            body = struct.pack("<BBBBxxII", 16, cfg_type, BAR_INDEX, 0, offset, length)
            if cfg_type == CFG_NOTIFY:
                body = struct.pack("<BBBBxxIII", 20, cfg_type, BAR_INDEX, 0, offset, length,
                                   NOTIFY_MULTIPLIER)
            config.add_capability(CAP_ID_VENDOR, body)
        self.msix = MsixTable(vm, config, num_queues + 1, BAR_INDEX, MSIX_TABLE_OFFSET,
                              MSIX_PBA_OFFSET, interrupt_lines=interrupt_lines)
        self.msix.on_change = self._rewire_calls

        bar = RegionMap(device.name)
        bar.add(COMMON_OFFSET, COMMON_SIZE, _Region(self._common_read, self._common_write))
        bar.add(ISR_OFFSET, ISR_SIZE, _Region(self._isr_read, lambda *a: None))
        bar.add(DEVICE_OFFSET, DEVICE_SIZE, _Region(self._device_read, self._device_write))
        bar.add(NOTIFY_OFFSET, NOTIFY_SIZE, _Region(lambda o, s: 0, self._notify_write))
        bar.add(MSIX_TABLE_OFFSET, self.msix.table_size, self.msix.table_device())
        bar.add(MSIX_PBA_OFFSET, self.msix.pba_size, self.msix.pba_device())
        self.bar_devices[BAR_INDEX] = bar
        self._start_worker()

    def _reset_state(self) -> None:
        super()._reset_state()
        self.config_msix_vector = NO_VECTOR

    # --- snapshots -----------------------------------------------------------------------------
    def save_state(self) -> VirtioPciState:
        """The transport's common state, the config MSI-X vector and the MSI-X table."""
        self._check_snapshot()
        with self._lock:
            return VirtioPciState(**self._save_common(),
                                  config_msix_vector=self.config_msix_vector,
                                  msix=self.msix.save_state())

    def restore_state(self, state: VirtioPciState) -> None:
        """After the config space (the PCI bus restores it first)."""
        with self._lock:
            self._restore_common(state)
            self.config_msix_vector = state.config_msix_vector
        self.msix.restore_state(state.msix)
        if self._isr and not self.msix.enabled:
            self._set_intx(True)
        self._kick_active()

    # --- doorbells ------------------------------------------------------------------------
    def bar_mapped(self, index: int, address: int) -> None:
        self._notify_base = address + NOTIFY_OFFSET
        for queue_index, fd in enumerate(self.queue_fds):
            self.vm.add_ioeventfd(self._notify_base + NOTIFY_MULTIPLIER * queue_index,
                                  NOTIFY_WIDTH, fd)

    def bar_unmapped(self, index: int, address: int) -> None:
        base, self._notify_base = self._notify_base, None
        if base is None:
            return
        for queue_index, fd in enumerate(self.queue_fds):
            self.vm.add_ioeventfd(base + NOTIFY_MULTIPLIER * queue_index, NOTIFY_WIDTH, fd,
                                  deassign=True)

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        # Only reached for writes the ioeventfds did not match (another width).
        index = offset // NOTIFY_MULTIPLIER
        if index < len(self.queues):
            self.kick(index)

    # --- common configuration ---------------------------------------------------------------
    def _common_read(self, offset: int, size: int) -> int:
        """One access, field by field: an aligned whole-field read (what drivers do) is
        one getter call; a partial or straddling one is assembled from the fields'
        bytes."""
        with self._lock:
            field = _FIELD_AT.get(offset)
            if field is not None and field.size == size:
                return field.get(self)
            value = 0
            for field in _COMMON_FIELDS:
                for byte in range(max(offset, field.offset),
                                  min(offset + size, field.offset + field.size)):
                    shift = 8 * (byte - field.offset)
                    value |= (field.get(self) >> shift & 0xFF) << 8 * (byte - offset)
            return value

    def _common_write(self, offset: int, size: int, value: int) -> None:
        """Each writable field the access covers gets its new bytes merged into its
        current value (Linux writes the 64-bit queue addresses as two 32-bit halves)."""
        with self._lock:
            field = _FIELD_AT.get(offset)
            if field is not None and field.size == size:
                if field.set is not None:
                    field.set(self, value)
                return
            for field in _COMMON_FIELDS:
                low, high = max(offset, field.offset), min(offset + size, field.offset + field.size)
                if field.set is None or low >= high:
                    continue
                merged = field.get(self)
                for byte in range(low, high):
                    shift = 8 * (byte - field.offset)
                    merged = merged & ~(0xFF << shift) | (value >> 8 * (byte - offset) & 0xFF) << shift
                field.set(self, merged)

    def _valid_vector(self, vector: int) -> int:
        # A vector the device cannot use reads back as NO_VECTOR; drivers check that.
        return vector if vector < self.msix.vectors else NO_VECTOR

    def _set_config_msix_vector(self, value: int) -> None:
        self.config_msix_vector = self._valid_vector(value)

    def _set_queue_msix_vector(self, value: int) -> None:
        queue = self._selected()
        if queue is not None:
            queue.msix_vector = self._valid_vector(value)
            self._rewire_calls()

    def _direct_call_fd(self, index: int) -> int | None:
        """The irqfd of the queue's MSI-X vector while it delivers (see transport.py)."""
        return self.msix.direct_fd(self.queues[index].msix_vector)

    def _set_queue_desc(self, value: int) -> None:
        self._set_queue_address("desc_addr", value)

    def _set_queue_driver(self, value: int) -> None:
        self._set_queue_address("avail_addr", value)

    def _set_queue_device(self, value: int) -> None:
        self._set_queue_address("used_addr", value)

    # --- ISR and interrupts ---------------------------------------------------------------------
    def _isr_read(self, offset: int, size: int) -> int:
        if offset != 0:
            return 0
        with self._isr_lock:
            value, self._isr = self._isr, 0
            self._set_intx(False)
        return value

    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        with self._isr_lock:
            self._isr |= isr_bit
            self._set_intx(True)

    def _signal_queue(self, index: int) -> None:
        self._interrupt(self.queues[index].msix_vector, ISR_QUEUE)

    def _lower_interrupt(self) -> None:
        self._set_intx(False)

    def _set_intx(self, high: bool) -> None:
        self.config.set_status_bit(STATUS_INTERRUPT, high)
        if self.intx is not None and not (high and self.config.command & COMMAND_INTX_DISABLE):
            self.intx.set_level(high)

    def interrupt_config(self) -> None:
        """Tell the driver the device configuration (or NEEDS_RESET) changed."""
        if self.msix.enabled:
            self._raise_isr(ISR_CONFIG)   # the spec wants the bit set whatever the delivery
        self._interrupt(self.config_msix_vector, ISR_CONFIG)

    def close(self) -> None:
        self._close_transport()
        self.msix.close()


T = VirtioPciDevice
_COMMON_FIELDS = (
    Register(0x00, 4, lambda t: t.device_feature_select, T._set_device_feature_select),
    Register(0x04, 4, lambda t: t._device_features_word()),
    Register(0x08, 4, lambda t: t.driver_feature_select, T._set_driver_feature_select),
    Register(0x0C, 4, lambda t: t._driver_features_word(), T._set_driver_feature),
    Register(0x10, 2, lambda t: t.config_msix_vector, T._set_config_msix_vector),
    Register(0x12, 2, lambda t: len(t.queues)),
    Register(0x14, 1, lambda t: t.status, T._set_device_status),
    Register(0x15, 1, lambda t: t.config_generation),
    Register(0x16, 2, lambda t: t.queue_select, T._set_queue_select),
    Register(0x18, 2, queue_value("size"), T._set_queue_size),
    Register(0x1A, 2, queue_value("msix_vector", NO_VECTOR), T._set_queue_msix_vector),
    Register(0x1C, 2, queue_value("enabled"), T._set_queue_enable),
    Register(0x1E, 2, lambda t: t.queue_select if t._selected() is not None else 0),
    Register(0x20, 8, queue_value("desc_addr"), T._set_queue_desc),
    Register(0x28, 8, queue_value("avail_addr"), T._set_queue_driver),
    Register(0x30, 8, queue_value("used_addr"), T._set_queue_device),
)
_FIELD_AT = {field.offset: field for field in _COMMON_FIELDS}
del T


class _Region(Device):
    def __init__(self, read, write):
        self._read, self._write = read, write

    def read(self, offset: int, size: int) -> int:
        return self._read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(offset, size, value)
