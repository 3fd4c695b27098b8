"""What every virtio transport does the same way (virtio 1.2 sections 2 and 3), whether
the driver reaches the device through a PCI BAR (pci.py, section 4.1) or an MMIO
register window (mmio.py, section 4.2).

The transport owns, for one :class:`~.device.VirtioDevice`:

- device status (2.1) and reset: status 0 resets synchronously, because the queue
  worker and the register handlers share one lock;
- feature negotiation (2.2, 3.1.1): VIRTIO_F_VERSION_1 is required (a legacy driver's
  FEATURES_OK is refused) and so is every bit the device did not offer;
- the queues' registers and their checks (2.7, 4.1.4.3, 4.2.2): a size that is not a
  power of two up to the device's maximum, a ring outside guest RAM, or a queue
  register written once the queue is live is the driver breaking the rules;
- the interrupt status bits (PCI's ISR, MMIO's InterruptStatus: bit 0 a used
  buffer, bit 1 a configuration change, the same in both);
- who serves the queues: a Python device's ``process_queue`` on the transport's
  worker thread (woken by the doorbell eventfds, which KVM signals from ioeventfds),
  or -- a device with ``external_queues`` -- another process, handed the queues at
  DRIVER_OK and stopped at reset (external_queues.py: the hand-over and which fd the
  back end signals a used buffer on).

The guest is hostile: a driver that breaks a rule (above, or a bad descriptor chain)
gets NEEDS_RESET and a configuration interrupt (2.1.2), the VM keeps running and the
device serves nothing until the driver resets it. Nothing a guest writes raises on
the vCPU thread.

A transport subclass supplies the register layout and the interrupt delivery:
:meth:`_signal_queue`, :meth:`interrupt_config` and :meth:`_lower_interrupt`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from ...memory import GuestMemory
from ...snapshot.state import SnapshotError, restore_part
from .device import (STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
                     VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
                     QueueWorker, VirtioDevice)
from .external_queues import ExternalQueues
from .poll import PollWindow, serve_queue
from .queue import Virtqueue, VirtqueueError
from .state import VirtioTransportState

logger = logging.getLogger(__name__)

INTERRUPT_QUEUE = 1     # ISR / InterruptStatus bit 0: a used buffer (4.1.4.5, 4.2.2)
INTERRUPT_CONFIG = 2    # bit 1: the device configuration (or NEEDS_RESET) changed


class DriverError(VirtqueueError):
    """The driver wrote a register it must not write now, or a value it must not write."""


class VirtioTransport(ExternalQueues):
    """The transport-neutral half of a virtio device's transport (see the module
    docstring). Subclasses call :meth:`_init_transport` and, once their own state is
    complete, :meth:`_start_worker`."""

    def _init_transport(self, vm, memory: GuestMemory, device: VirtioDevice) -> None:
        self.name = device.name
        self.vm = vm
        self.memory = memory
        self.device = device
        self.queues = [Virtqueue(memory, size) for size in device.queue_sizes]
        self.queue_fds = [vm.new_eventfd() for _ in device.queue_sizes]
        self.poll_windows = [PollWindow() for _ in device.queue_sizes]   # poll.py: the cap
        device.kick = self.kick
        self._lock = threading.RLock()     # transport state + request processing
        self._isr_lock = threading.Lock()
        self._isr = 0
        self._logged_failure = False
        self.failures = 0
        self.external = bool(getattr(device, "external_queues", False))
        self._reset_state()

    def _start_worker(self) -> None:
        device = self.device
        if self.external:
            device.fail = self.fail
            self.call_fds = [self.vm.new_eventfd() for _ in self.queues]
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
        self.queue_select = 0
        self.running = False
        self.broken = False
        self._wired: dict[int, int] = {}    # external queues: the call fd the back end has
        for queue in self.queues:
            queue.reset()

    # --- what a transport supplies ------------------------------------------------------------
    def _signal_queue(self, index: int) -> None:
        """Interrupt the driver: queue ``index`` has used buffers."""
        raise NotImplementedError

    def interrupt_config(self) -> None:
        """Tell the driver the device configuration (or NEEDS_RESET) changed."""
        raise NotImplementedError

    def _lower_interrupt(self) -> None:
        """Reset: take back an interrupt still asserted (PCI INTx); edge transports: nothing."""

    def _raise_isr(self, bits: int) -> None:
        with self._isr_lock:
            self._isr |= bits

    # --- snapshots -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def quiesced(self):
        """While inside, no request is in flight: the worker waits at the transport lock."""
        with self._lock:
            yield

    def _save_common(self) -> dict:
        """The fields of :class:`VirtioTransportState`, transport lock held."""
        with self._isr_lock:
            isr = self._isr
        if self.running:
            self.device.give_back_held_chains(self.queues)
        device = self.device.save_state() if hasattr(self.device, "save_state") else None
        return dict(
            device_id=self.device.device_id, status=self.status,
            config_generation=self.config_generation,
            device_feature_select=self.device_feature_select,
            driver_feature_select=self.driver_feature_select,
            driver_features=self.driver_features, queue_select=self.queue_select,
            running=self.running, broken=self.broken, isr=isr,
            queues=tuple(queue.save_state() for queue in self.queues),
            config=bytes(self.device.config_bytes()), device=device)

    def _restore_common(self, state: VirtioTransportState) -> None:
        """The inverse of :meth:`_save_common`, transport lock held. A running device is
        activated again with its negotiated features; :meth:`_kick_active` afterwards
        serves requests the guest made just before the snapshot."""
        if state.device_id != self.device.device_id or len(state.queues) != len(self.queues):
            raise SnapshotError(f"{self.name}: the saved state is of another device")
        if (state.device is None) != (not hasattr(self.device, "save_state")):
            raise SnapshotError(f"{self.name}: the saved device state does not fit")
        self.status = state.status
        self.config_generation = state.config_generation
        self.device_feature_select = state.device_feature_select
        self.driver_feature_select = state.driver_feature_select
        self.driver_features = state.driver_features & self.device.offered_features
        self.queue_select = state.queue_select
        self.broken = state.broken
        for queue, saved in zip(self.queues, state.queues):
            queue.restore_state(saved)
        if state.device is not None:
            restore_part(self.device, state.device, f"{self.name}.device")
        self.running = state.running
        if self.running:
            self.device.activate(self.driver_features)
        with self._isr_lock:
            self._isr = state.isr & (INTERRUPT_QUEUE | INTERRUPT_CONFIG)

    def _kick_active(self) -> None:
        if self.running:
            for index, queue in enumerate(self.queues):
                if queue.active:
                    self.kick(index)

    # --- doorbells ----------------------------------------------------------------------------
    def kick(self, index: int) -> None:
        """Wake the worker for queue ``index`` (host-side input, or after activation)."""
        os.eventfd_write(self.queue_fds[index], 1)

    # --- registers both transports have (called with the transport lock held) -----------------
    def _selected(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    @staticmethod
    def _feature_word(features: int, select: int) -> int:
        return (features >> 32 * select) & 0xFFFFFFFF if select < 2 else 0

    def _device_features_word(self) -> int:
        return self._feature_word(self.device.offered_features, self.device_feature_select)

    def _driver_features_word(self) -> int:
        return self._feature_word(self.driver_features, self.driver_feature_select)

    def _set_device_feature_select(self, value: int) -> None:
        self.device_feature_select = value

    def _set_driver_feature_select(self, value: int) -> None:
        self.driver_feature_select = value

    def _set_driver_feature(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK:
            self._violation("driver features written after FEATURES_OK")
            return
        select = self.driver_feature_select
        if select < 2:
            shift = 32 * select
            self.driver_features = self.driver_features & ~(0xFFFFFFFF << shift) | value << shift

    def _set_queue_select(self, value: int) -> None:
        self.queue_select = value

    def _live_queue(self, register: str) -> Virtqueue | None:
        """The selected queue, if its registers may be written now; a write to a live
        queue is a rule broken (2.7: only before DRIVER_OK, and not once enabled)."""
        queue = self._selected()
        if queue is not None and (queue.active or queue.enabled):
            self._violation(f"{register} of live queue {self.queue_select} written")
            return None
        return queue

    def _set_queue_size(self, value: int) -> None:
        queue = self._live_queue("queue size")
        if queue is None:
            return
        if not 1 <= value <= queue.max_size or value & (value - 1):
            self._violation(f"queue {self.queue_select} size {value} is not a power of two "
                            f"up to {queue.max_size}")
            return
        queue.size = value

    def _set_queue_address(self, attribute: str, value: int) -> None:
        queue = self._live_queue(attribute)
        if queue is not None:
            setattr(queue, attribute, value)

    def _set_queue_address_half(self, attribute: str, high: bool, value: int) -> None:
        """MMIO's QueueDescLow/High and friends; PCI's 64-bit fields written as halves."""
        queue = self._selected()
        if queue is None:
            return
        old, shift = getattr(queue, attribute), 32 if high else 0
        self._set_queue_address(attribute, old & ~(0xFFFFFFFF << shift) | value << shift)

    def _set_queue_enable(self, value: int) -> None:
        queue = self._selected()
        if queue is None:
            return
        if value == 1 and not queue.enabled:
            try:
                queue.check_registers()
            except VirtqueueError as error:
                self._violation(f"queue {self.queue_select} enabled with {error}")
                return
            queue.enabled = True
        elif value == 0 and (queue.enabled or queue.active):
            if queue.active:
                self._violation(f"live queue {self.queue_select} disabled without a reset")
                return
            queue.enabled = False

    def _set_device_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= 0xFF
        if self.status & ~value & ~STATUS_NEEDS_RESET:
            self._violation(f"device status {self.status:#x} -> {value:#x} clears bits "
                            f"without a reset")
            return
        added = value & ~self.status
        if added & STATUS_FEATURES_OK and not self._features_acceptable():
            value &= ~STATUS_FEATURES_OK   # the driver reads it back and gives up
        if added & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK \
                and not value & STATUS_FAILED:
            self._violation("DRIVER_OK without FEATURES_OK")
            return
        self.status = value | (self.status & STATUS_NEEDS_RESET)
        if added & STATUS_DRIVER_OK and not self.broken and not value & STATUS_FAILED:
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
        self._kick_active()   # buffers offered before DRIVER_OK

    def reset(self) -> None:
        """Status 0: back to the state after power-on; returns when no request is in flight."""
        with self._lock:
            self.device.reset()
            self._reset_state()
            with self._isr_lock:
                self._isr = 0
            self._lower_interrupt()

    def _device_read(self, offset: int, size: int) -> int:
        return self.device.read_config(offset, size)

    def _device_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.device.write_config(offset, size, value)

    # --- the data path (worker thread) -----------------------------------------------------------
    def _process(self, index: int) -> None:
        serve_queue(self, index)    # poll.py: serve, interrupt, poll the ring, sleep

    def _violation(self, message: str) -> None:
        self.fail(DriverError(message))

    def fail(self, error: BaseException) -> None:
        """The guest broke the rules: stop serving queues until it resets the device."""
        with self._lock:
            self.failures += 1
            if not self._logged_failure:
                self._logged_failure = True
                logger.warning("%s: %s; device needs reset", self.name, error)
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

    def _close_transport(self) -> None:
        self.worker.stop()
        with self._lock:
            self.device.close()


@dataclass(frozen=True)
class Register:
    """One register of a transport's register file (PCI's common configuration,
    MMIO's control registers): where, how wide, how to read and write it (``set``
    None: read-only). Both transports describe their layout as a table of these over
    the same :class:`VirtioTransport` accessors."""
    offset: int
    size: int
    get: Callable[[VirtioTransport], int]
    set: Callable[[VirtioTransport, int], None] | None = None


def queue_value(attribute: str, default: int = 0) -> Callable[[VirtioTransport], int]:
    """A getter for an attribute of the selected queue (``default`` when none is)."""
    def get(transport: VirtioTransport) -> int:
        queue = transport._selected()
        return int(getattr(queue, attribute)) if queue is not None else default
    return get
