"""The virtio-mmio transport (virtio 1.2, section 4.2), version 2 (the modern layout
only: a legacy version-1 driver finds Version 2 and gives up), around a VirtioDevice.

Each device is one page of registers in the window pykvm/layout.py reserves
(VIRTIO_MMIO_START, one VIRTIO_MMIO_SLOT per device) and one ISA IRQ; nothing is
discovered by the guest, so Linux is told on its command line, as Firecracker does:
``virtio_mmio.device=4K@0xd0000000:6`` per device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
Such a guest needs no PCI at all (``pci=off``: firectl's and Kata's command lines).

Registers (4.2.2; all 32 bits wide and aligned, anything else reads 0 and is ignored,
as 4.2.2.2 has the driver use only those):

    0x000 MagicValue "virt"   0x004 Version 2     0x008 DeviceID     0x00c VendorID
    0x010 DeviceFeatures      0x014 DeviceFeaturesSel
    0x020 DriverFeatures      0x024 DriverFeaturesSel
    0x030 QueueSel  0x034 QueueNumMax  0x038 QueueNum  0x044 QueueReady  0x050 QueueNotify
    0x060 InterruptStatus     0x064 InterruptACK  0x070 Status
    0x080/0x084 QueueDesc, 0x090/0x094 QueueDriver, 0x0a0/0x0a4 QueueDevice (low/high)
    0x0ac SHMSel, 0x0b0.. SHMLen/SHMBase (no shared memory regions: length reads -1)
    0x0fc ConfigGeneration    0x100.. the device-specific configuration

Doorbells: QueueNotify takes the queue's index, so KVM matches one ioeventfd per queue
on that register with the index as datamatch; a notify never exits to Python (a write
that matches none -- another index, another width -- is handled here).

Interrupts: an irqfd on the device's GSI. Linux's virtio_mmio driver
(``vm_interrupt``, IRQF_SHARED) reads InterruptStatus, writes the bits back to
InterruptACK and only then walks the rings, so a buffer used after the read is seen
by that walk or signalled again. Edge triggering therefore loses nothing, and it is
what an irqfd gives: each signal is an assert-and-deassert pulse, one rising edge that
KVM's IOAPIC delivers even while an earlier one is in service. A *level* pin pulsed
that way could lose an interrupt (a pulse while the pin's Remote IRR is set is
dropped), which is why the IRQs come from the ISA ones the MADT and MP table leave
edge-triggered (layout.VIRTIO_MMIO_IRQS), never the level PCI INTx ones.
Because the driver ignores an interrupt whose InterruptStatus reads 0, a vhost-user
back end on this transport cannot signal the irqfd itself (as it does a PCI MSI-X
vector's): it signals the transport's call eventfd and pykvm's thread sets bit 0
before the pulse (external_queues.py: no ``_direct_call_fd`` here).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ... import layout
from ...bus import Device
from ...errors import ConfigError
from ...interrupts import EventfdIrqLine
from ...memory import GuestMemory
from .device import VirtioDevice
from .state import VirtioTransportState
from .transport import INTERRUPT_CONFIG, INTERRUPT_QUEUE, Register, VirtioTransport, queue_value

MAGIC_VALUE = 0x74726976          # "virt", little-endian
VERSION = 2                       # the virtio 1.x ("non-legacy") register layout
VENDOR_ID = 0x554D4551            # "QEMU", what Linux and other VMMs' devices report
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
CONFIG_OFFSET = 0x100
REGISTER_WIDTH = 4


@dataclass(frozen=True)
class VirtioMmioState(VirtioTransportState, tag="virtio-mmio"):
    """A virtio-mmio device: the transport's state (InterruptStatus is its ``isr``)."""


class VirtioMmioDevice(Device, VirtioTransport):
    """One virtio device behind an MMIO register page at ``base``, interrupting on
    ``irq`` (an IrqLine; :class:`~pykvm.interrupts.EventfdIrqLine` in a VM)."""

    def __init__(self, vm, memory: GuestMemory, device: VirtioDevice, *, base: int, gsi: int,
                 irq=None):
        self.base = base
        self.gsi = gsi
        self.irq = irq if irq is not None else EventfdIrqLine(vm, gsi)
        self.interrupts = 0
        self._closed = False
        self._init_transport(vm, memory, device)
        self._notify_fds: list[int] = []
        vm.add_mmio_device(base, layout.VIRTIO_MMIO_SLOT, self)
        for index, fd in enumerate(self.queue_fds):
            vm.add_ioeventfd(base + QUEUE_NOTIFY, REGISTER_WIDTH, fd, datamatch=index)
            self._notify_fds.append(fd)
        self._start_worker()

    def cmdline(self) -> str:
        """How Linux learns of this device (drivers/virtio/virtio_mmio.c, vm_cmdline_set)."""
        return f"virtio_mmio.device={layout.VIRTIO_MMIO_SLOT // 1024}K@{self.base:#x}:{self.gsi}"

    # --- registers (vCPU threads) -----------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_OFFSET:
            return self._device_read(offset - CONFIG_OFFSET, size)
        register = _REGISTER_AT.get(offset)
        if register is None or size != REGISTER_WIDTH:
            return 0
        if offset in _WITHOUT_LOCK:
            return register.get(self)
        with self._lock:
            return register.get(self) & 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= CONFIG_OFFSET:
            self._device_write(offset - CONFIG_OFFSET, size, value)
            return
        register = _REGISTER_AT.get(offset)
        if register is None or register.set is None or size != REGISTER_WIDTH:
            return
        if offset in _WITHOUT_LOCK:
            register.set(self, value & 0xFFFFFFFF)
            return
        with self._lock:
            register.set(self, value & 0xFFFFFFFF)

    def _notify(self, value: int) -> None:
        # Only reached for a write no ioeventfd matched: an index with no queue.
        if value < len(self.queues):
            self.kick(value)

    def _interrupt_status(self) -> int:
        with self._isr_lock:
            return self._isr

    def _acknowledge(self, value: int) -> None:
        with self._isr_lock:
            self._isr &= ~value

    # --- interrupts ---------------------------------------------------------------------------
    def _pulse(self, bits: int) -> None:
        self._raise_isr(bits)
        self.interrupts += 1
        self.irq.pulse()

    def _signal_queue(self, index: int) -> None:
        self._pulse(INTERRUPT_QUEUE)

    def interrupt_config(self) -> None:
        self._pulse(INTERRUPT_CONFIG)

    # --- snapshots -----------------------------------------------------------------------------
    def save_state(self) -> VirtioMmioState:
        """The transport's common state (status, features, queues, InterruptStatus, ...)."""
        self._check_snapshot()
        with self._lock:
            return VirtioMmioState(**self._save_common())

    def restore_state(self, state: VirtioMmioState) -> None:
        """Onto a device built from the same configuration at the same address. An
        interrupt the guest had not acknowledged is sent again (an edge is not state
        KVM's IOAPIC snapshot keeps for us), and active queues are served."""
        with self._lock:
            self._restore_common(state)
        if self._isr:
            self.irq.pulse()
        self._kick_active()

    def close(self) -> None:
        """Idempotent: the VM closes what is still on its MMIO bus, MmioDevices too."""
        if self._closed:
            return
        self._closed = True
        if self.vm.fd >= 0:
            for index, fd in enumerate(self._notify_fds):
                self.vm.add_ioeventfd(self.base + QUEUE_NOTIFY, REGISTER_WIDTH, fd,
                                      datamatch=index, deassign=True)
        self._notify_fds = []
        self._close_transport()


def _constant(value: int):
    return lambda transport: value


T = VirtioMmioDevice
_REGISTERS = (
    Register(0x000, 4, _constant(MAGIC_VALUE)),
    Register(0x004, 4, _constant(VERSION)),
    Register(0x008, 4, lambda t: t.device.device_id),
    Register(0x00C, 4, _constant(VENDOR_ID)),
    Register(0x010, 4, lambda t: t._device_features_word()),
    Register(0x014, 4, lambda t: t.device_feature_select, T._set_device_feature_select),
    Register(0x020, 4, lambda t: t._driver_features_word(), T._set_driver_feature),
    Register(0x024, 4, lambda t: t.driver_feature_select, T._set_driver_feature_select),
    Register(0x030, 4, lambda t: t.queue_select, T._set_queue_select),
    Register(0x034, 4, queue_value("max_size")),
    Register(0x038, 4, queue_value("size"), T._set_queue_size),
    Register(0x044, 4, queue_value("enabled"), T._set_queue_enable),
    Register(QUEUE_NOTIFY, 4, _constant(0), T._notify),
    Register(INTERRUPT_STATUS, 4, T._interrupt_status),
    Register(INTERRUPT_ACK, 4, _constant(0), T._acknowledge),
    Register(0x070, 4, lambda t: t.status, T._set_device_status),
    *(Register(offset + 4 * high, 4,
               lambda t, a=attribute, h=high: queue_value(a)(t) >> 32 * h & 0xFFFFFFFF,
               lambda t, v, a=attribute, h=high: t._set_queue_address_half(a, bool(h), v))
      for offset, attribute in ((0x080, "desc_addr"), (0x090, "avail_addr"),
                                (0x0A0, "used_addr"))
      for high in (0, 1)),
    Register(0x0AC, 4, _constant(0), lambda t, v: None),          # SHMSel
    Register(0x0B0, 4, _constant(0xFFFFFFFF)),                    # SHMLenLow: no region
    Register(0x0B4, 4, _constant(0xFFFFFFFF)),                    # SHMLenHigh
    Register(0x0FC, 4, lambda t: t.config_generation),
)
_REGISTER_AT = {register.offset: register for register in _REGISTERS}
# The guest's interrupt handler reads InterruptStatus and writes InterruptACK while the
# worker may hold the transport lock for a long request: these take the ISR lock only.
_WITHOUT_LOCK = frozenset({QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK})
del T


class MmioDevices:
    """The virtio-mmio devices of one VM: the slot and IRQ of each (from layout.py) and
    the command line that announces them. Devices close with the VM; a snapshot finds
    them on the VM's MMIO bus (``name@base``), as any other device there."""

    def __init__(self, vm):
        self.vm = vm
        self._devices: list[VirtioMmioDevice] = []
        self._lock = threading.Lock()
        vm.on_close(self.close)

    def add(self, memory: GuestMemory, device: VirtioDevice) -> VirtioMmioDevice:
        with self._lock:
            slot = len(self._devices)
            if slot >= layout.VIRTIO_MMIO_SLOTS:
                raise ConfigError(f"no room for {device.name}: at most "
                                  f"{layout.VIRTIO_MMIO_SLOTS} virtio-mmio devices")
            gsi = layout.VIRTIO_MMIO_IRQS[slot % len(layout.VIRTIO_MMIO_IRQS)]
            transport = VirtioMmioDevice(self.vm, memory, device, gsi=gsi,
                                         base=layout.VIRTIO_MMIO_START
                                         + slot * layout.VIRTIO_MMIO_SLOT)
            self._devices.append(transport)
            return transport

    def devices(self) -> list[tuple[int, VirtioMmioDevice]]:
        return list(enumerate(self._devices))

    def cmdline(self) -> str:
        return " ".join(device.cmdline() for device in self._devices)

    def close(self) -> None:
        with self._lock:
            devices, self._devices = self._devices, []
        for device in devices:
            device.close()
