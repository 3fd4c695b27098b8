"""The virtio-pci modern transport (virtio 1.x, section 4.1) around a VirtioDevice.

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

Feature negotiation: VIRTIO_F_VERSION_1 is required (a legacy driver's
FEATURES_OK is refused), and any bit the device did not offer is refused too.
Status 0 resets the device synchronously: the queue worker is between requests
when the write returns, because both hold the transport lock.

Who serves the queues: a Python device's ``process_queue`` on the transport's
worker thread (woken by the doorbell eventfds), or -- for a device with
``external_queues`` (pykvm/vhost_user/device.py) -- another process, handed the
queues at DRIVER_OK (``start_queues``) and stopped at reset. Such a back end
signals a used buffer on a per-queue call eventfd; the worker then polls those and
raises the queue's interrupt (MSI-X or INTx, masking honoured), so the transport
stays the one place that knows how this device interrupts.
"""

from __future__ import annotations

import base64
import contextlib
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from ...bus import Device
from ...memory import GuestMemory
from ..pci.config import (COMMAND_INTX_DISABLE, INTX_PIN_A, STATUS_INTERRUPT, Bar,
                          ConfigSpace)
from ..pci.device import PciDevice, RegionMap
from ..pci.msix import NO_VECTOR, MsixTable
from .device import (STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
                     VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
                     QueueWorker, VirtioDevice)
from .queue import Virtqueue, VirtqueueError

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

ISR_QUEUE = 1
ISR_CONFIG = 2

# Common configuration (4.1.4.3): what is not a field below (queue_notify_data,
# queue_reset at 0x38..0x3B) reads 0 and ignores writes.


class VirtioPciDevice(PciDevice):
    def __init__(self, vm, memory: GuestMemory, device: VirtioDevice, *, log=None,
                 interrupt_lines=None):
        num_queues = len(device.queue_sizes)
        config = ConfigSpace(vendor_id=PCI_VENDOR_VIRTIO,
                             device_id=PCI_DEVICE_MODERN_BASE + device.device_id,
                             class_code=PCI_CLASS.get(device.device_id, 0xFF0000), revision=1,
                             subsystem_vendor_id=PCI_VENDOR_VIRTIO,
                             subsystem_id=PCI_SUBSYSTEM_MODERN, interrupt_pin=INTX_PIN_A)
        super().__init__(config)
        self.name = device.name
        self.vm = vm
        self.memory = memory
        self.device = device
        self.log = log or getattr(vm, "log", sys.stderr)
        self.queues = [Virtqueue(memory, size) for size in device.queue_sizes]
        self.queue_fds = [vm.new_eventfd() for _ in range(num_queues)]
        device.kick = self.kick
        self._lock = threading.RLock()     # transport state + request processing
        self._isr_lock = threading.Lock()
        self._isr = 0
        self._notify_base: int | None = None
        self._logged_failure = False
        self.failures = 0
        self._reset_state()

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

        bar = RegionMap(device.name)
        bar.add(COMMON_OFFSET, COMMON_SIZE, _Region(self._common_read, self._common_write))
        bar.add(ISR_OFFSET, ISR_SIZE, _Region(self._isr_read, lambda *a: None))
        bar.add(DEVICE_OFFSET, DEVICE_SIZE, _Region(self._device_read, self._device_write))
        bar.add(NOTIFY_OFFSET, NOTIFY_SIZE, _Region(lambda o, s: 0, self._notify_write))
        bar.add(MSIX_TABLE_OFFSET, self.msix.table_size, self.msix.table_device())
        bar.add(MSIX_PBA_OFFSET, self.msix.pba_size, self.msix.pba_device())
        self.bar_devices[BAR_INDEX] = bar

        self.external = bool(getattr(device, "external_queues", False))
        if self.external:
            device.fail = self.fail
            self.call_fds = [vm.new_eventfd() for _ in range(num_queues)]
            self.worker = QueueWorker(f"{device.name}-irq", self.call_fds, self._backend_used,
                                      self._worker_error)
        else:
            self.worker = QueueWorker(f"{device.name}-io", self.queue_fds, self._process,
                                      self._worker_error)
        self.worker.start()

    def _reset_state(self) -> None:
        self.status = 0
        self.config_generation = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.running = False
        self.broken = False
        for queue in self.queues:
            queue.reset()

    # --- snapshots -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def quiesced(self):
        """While inside, no request is in flight: the worker waits at the transport lock."""
        with self._lock:
            yield

    def save_state(self) -> dict:
        """Status, features, the queues' registers and indices, MSI-X, ISR, the device
        configuration (blk capacity, ...) and what the device itself keeps."""
        if self.external:
            from ...errors import VhostUserError
            raise VhostUserError(f"{self.name}: a VM with a vhost-user device (a live --share) "
                                 f"cannot be snapshotted yet: its queues and the back end's "
                                 f"state live in another process (use --share DIR,copy)")
        with self._lock:
            with self._isr_lock:
                isr = self._isr
            return {
                "device_id": self.device.device_id, "status": self.status,
                "config_generation": self.config_generation,
                "device_feature_select": self.device_feature_select,
                "driver_feature_select": self.driver_feature_select,
                "driver_features": self.driver_features,
                "config_msix_vector": self.config_msix_vector, "queue_select": self.queue_select,
                "running": self.running, "broken": self.broken, "isr": isr,
                "queues": [queue.save_state() for queue in self.queues],
                "msix": self.msix.save_state(),
                "config": base64.b64encode(self.device.config_bytes()).decode(),
                "device": self.device.save_state() if hasattr(self.device, "save_state") else None,
            }

    def restore_state(self, state: dict) -> None:
        """After the config space (the PCI bus restores it first). A running device is
        activated again with its negotiated features and its active queues are kicked,
        so requests the guest made just before the snapshot are served now."""
        if state["device_id"] != self.device.device_id or len(state["queues"]) != len(self.queues):
            raise ValueError(f"{self.name}: the saved state is of another device")
        with self._lock:
            self.status = state["status"] & 0xFF
            self.config_generation = state["config_generation"] & 0xFF
            self.device_feature_select = state["device_feature_select"]
            self.driver_feature_select = state["driver_feature_select"]
            self.driver_features = state["driver_features"]
            self.config_msix_vector = state["config_msix_vector"] & 0xFFFF
            self.queue_select = state["queue_select"] & 0xFFFF
            self.broken = bool(state["broken"])
            for queue, saved in zip(self.queues, state["queues"]):
                queue.restore_state(saved)
            if state["device"] is not None:
                self.device.restore_state(state["device"])
            self.running = bool(state["running"])
            if self.running:
                self.device.activate(self.driver_features)
            with self._isr_lock:
                self._isr = state["isr"] & (ISR_QUEUE | ISR_CONFIG)
        self.msix.restore_state(state["msix"])
        if self._isr and not self.msix.enabled:
            self._set_intx(True)
        if self.running:
            for index, queue in enumerate(self.queues):
                if queue.active:
                    self.kick(index)

    # --- doorbells ------------------------------------------------------------------------
    def kick(self, index: int) -> None:
        """Wake the worker for queue ``index`` (host-side input, or after activation)."""
        os.eventfd_write(self.queue_fds[index], 1)

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
    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

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

    def _feature_word(self, features: int, select: int) -> int:
        return (features >> 32 * select) & 0xFFFFFFFF if select < 2 else 0

    def _set_device_feature_select(self, value: int) -> None:
        self.device_feature_select = value

    def _set_driver_feature_select(self, value: int) -> None:
        self.driver_feature_select = value

    def _set_driver_feature(self, value: int) -> None:
        select = self.driver_feature_select
        if select < 2 and not self.status & STATUS_FEATURES_OK:
            shift = 32 * select
            self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift

    def _valid_vector(self, vector: int) -> int:
        # A vector the device cannot use reads back as NO_VECTOR; drivers check that.
        return vector if vector < self.msix.vectors else NO_VECTOR

    def _set_config_msix_vector(self, value: int) -> None:
        self.config_msix_vector = self._valid_vector(value)

    def _set_queue_select(self, value: int) -> None:
        self.queue_select = value

    def _set_queue_msix_vector(self, value: int) -> None:
        queue = self._selected()
        if queue is not None:
            queue.msix_vector = self._valid_vector(value)

    def _set_queue_size(self, value: int) -> None:
        queue = self._selected()
        if queue is not None and not queue.active:
            queue.size = value

    def _set_queue_enable(self, value: int) -> None:
        queue = self._selected()
        if queue is not None and value == 1:
            queue.enabled = True

    def _set_queue_desc(self, value: int) -> None:
        self._set_queue_address("desc_addr", value)

    def _set_queue_driver(self, value: int) -> None:
        self._set_queue_address("avail_addr", value)

    def _set_queue_device(self, value: int) -> None:
        self._set_queue_address("used_addr", value)

    def _set_queue_address(self, attribute: str, value: int) -> None:
        queue = self._selected()
        if queue is not None and not queue.active:
            setattr(queue, attribute, value)

    def _set_device_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        added = value & ~self.status
        if added & STATUS_FEATURES_OK and not self._features_acceptable():
            value &= ~STATUS_FEATURES_OK   # the driver reads it back and gives up
        self.status = value | (self.status & STATUS_NEEDS_RESET)
        if added & STATUS_DRIVER_OK and self.status & STATUS_FEATURES_OK:
            self._activate()

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        return bool(features & VIRTIO_F_VERSION_1) and not features & ~self.device.offered_features

    def _activate(self) -> None:
        features = self.driver_features
        try:
            for queue in self.queues:
                if queue.enabled:
                    queue.activate(indirect=bool(features & VIRTIO_F_RING_INDIRECT_DESC),
                                   event_idx=bool(features & VIRTIO_F_RING_EVENT_IDX))
        except VirtqueueError as error:
            self.fail(error)
            return
        self.device.activate(features)
        if self.external and not self._hand_over(features):
            return
        self.running = True
        for index, queue in enumerate(self.queues):
            if queue.active:
                self.kick(index)   # buffers offered before DRIVER_OK

    def _hand_over(self, features: int) -> bool:
        """DRIVER_OK of an external device: give the back end its queues."""
        from ...errors import VhostUserError
        from ...vhost_user.device import QueueHandoff
        from ...vhost_user.frontend import Vring
        vrings = [Vring(index, queue.size, queue.desc_addr, queue.avail_addr, queue.used_addr,
                        self.queue_fds[index], self.call_fds[index])
                  for index, queue in enumerate(self.queues) if queue.active]
        try:
            self.device.start_queues(QueueHandoff(features, self.memory, vrings))
        except VhostUserError as error:
            self.fail(error)
            return False
        return True

    def _backend_used(self, index: int) -> None:
        """A back end's call eventfd fired: interrupt the driver for queue ``index``."""
        if self.running and not self.broken:
            self._interrupt(self.queues[index].msix_vector, ISR_QUEUE)

    def reset(self) -> None:
        """Status 0: back to the state after power-on; returns when no request is in flight."""
        with self._lock:
            self.device.reset()
            self._reset_state()
            with self._isr_lock:
                self._isr = 0
            self._set_intx(False)

    # --- ISR and device configuration --------------------------------------------------------
    def _isr_read(self, offset: int, size: int) -> int:
        if offset != 0:
            return 0
        with self._isr_lock:
            value, self._isr = self._isr, 0
            self._set_intx(False)
        return value

    def _device_read(self, offset: int, size: int) -> int:
        return self.device.read_config(offset, size)

    def _device_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.device.write_config(offset, size, value)

    # --- interrupts -----------------------------------------------------------------------------
    def _interrupt(self, vector: int, isr_bit: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                self.msix.notify(vector)
            return
        with self._isr_lock:
            self._isr |= isr_bit
            self._set_intx(True)

    def _set_intx(self, high: bool) -> None:
        self.config.set_status_bit(STATUS_INTERRUPT, high)
        if self.intx is not None and not (high and self.config.command & COMMAND_INTX_DISABLE):
            self.intx.set_level(high)

    def interrupt_config(self) -> None:
        """Tell the driver the device configuration (or NEEDS_RESET) changed."""
        if self.msix.enabled:
            with self._isr_lock:
                self._isr |= ISR_CONFIG   # the spec wants the bit set whatever the delivery
        self._interrupt(self.config_msix_vector, ISR_CONFIG)

    # --- the data path (worker thread) -----------------------------------------------------------
    def _process(self, index: int) -> None:
        with self._lock:
            queue = self.queues[index]
            if not self.running or self.broken or not queue.active:
                return
            try:
                while True:
                    self.device.process_queue(index, queue)
                    if queue.should_interrupt():
                        self._interrupt(queue.msix_vector, ISR_QUEUE)
                    if not queue.enable_notification() or not self.device.wants_more(index):
                        break
            except VirtqueueError as error:
                self.fail(error)

    def fail(self, error: BaseException) -> None:
        """The guest broke the rules: stop serving queues until it resets the device."""
        with self._lock:
            self.failures += 1
            if not self._logged_failure:
                self._logged_failure = True
                print(f"pykvm: {self.name}: {error}; device needs reset", file=self.log)
            if self.broken:
                return
            self.broken = True
            self.running = False
            self.status |= STATUS_NEEDS_RESET
            self.config_generation = (self.config_generation + 1) & 0xFF
        self.interrupt_config()

    def _worker_error(self, error: BaseException) -> None:
        self.fail(RuntimeError(f"internal error: {type(error).__name__}: {error}"))

    def config_changed(self) -> None:
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self.interrupt_config()

    def close(self) -> None:
        self.worker.stop()
        with self._lock:
            self.device.close()
        self.msix.close()


@dataclass(frozen=True)
class _Field:
    """One common-configuration register: where, how wide, how to read and write it
    (``set`` None: read-only)."""
    offset: int
    size: int
    get: Callable[[VirtioPciDevice], int]
    set: Callable[[VirtioPciDevice, int], None] | None = None


def _queue_value(attribute: str, default: int = 0) -> Callable[[VirtioPciDevice], int]:
    def get(transport: VirtioPciDevice) -> int:
        queue = transport._selected()
        return int(getattr(queue, attribute)) if queue is not None else default
    return get


T = VirtioPciDevice
_COMMON_FIELDS = (
    _Field(0x00, 4, lambda t: t.device_feature_select, T._set_device_feature_select),
    _Field(0x04, 4, lambda t: t._feature_word(t.device.offered_features,
                                              t.device_feature_select)),
    _Field(0x08, 4, lambda t: t.driver_feature_select, T._set_driver_feature_select),
    _Field(0x0C, 4, lambda t: t._feature_word(t.driver_features, t.driver_feature_select),
           T._set_driver_feature),
    _Field(0x10, 2, lambda t: t.config_msix_vector, T._set_config_msix_vector),
    _Field(0x12, 2, lambda t: len(t.queues)),
    _Field(0x14, 1, lambda t: t.status, T._set_device_status),
    _Field(0x15, 1, lambda t: t.config_generation),
    _Field(0x16, 2, lambda t: t.queue_select, T._set_queue_select),
    _Field(0x18, 2, _queue_value("size"), T._set_queue_size),
    _Field(0x1A, 2, _queue_value("msix_vector", NO_VECTOR), T._set_queue_msix_vector),
    _Field(0x1C, 2, _queue_value("enabled"), T._set_queue_enable),
    _Field(0x1E, 2, lambda t: t.queue_select if t._selected() is not None else 0),
    _Field(0x20, 8, _queue_value("desc_addr"), T._set_queue_desc),
    _Field(0x28, 8, _queue_value("avail_addr"), T._set_queue_driver),
    _Field(0x30, 8, _queue_value("used_addr"), T._set_queue_device),
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
