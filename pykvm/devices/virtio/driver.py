"""The guest's side of a split virtqueue, of virtio-pci and of virtio-mmio, in Python: what tests
and benches use to drive a device without booting a guest.

It writes rings and registers exactly as a driver would (and can be told to
write garbage, which is how the tests play a hostile guest).
"""

from __future__ import annotations

import os
import struct

from ...bus import MmioBus, PioBus
from ...errors import PykvmError
from ...memory import GuestMemory
from .queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESCRIPTOR_SIZE

_DESCRIPTOR = struct.Struct("<QIHH")


class DriverRing:
    """A split ring laid out at ``base``: descriptors, avail ring, used ring."""

    def __init__(self, memory: GuestMemory, base: int, size: int):
        self.memory, self.size = memory, size
        self.desc_addr = base
        self.avail_addr = base + DESCRIPTOR_SIZE * size
        self.used_addr = (self.avail_addr + 6 + 2 * size + 3) & ~3
        self.end = self.used_addr + 6 + 8 * size
        memory.fill(base, self.end - base, 0)
        self.avail_idx = 0
        self.last_used = 0
        self._next_desc = 0

    def write_descriptor(self, index: int, addr: int, length: int, flags: int = 0,
                         next_index: int = 0, table: int | None = None) -> None:
        base = self.desc_addr if table is None else table
        self.memory.write(base + DESCRIPTOR_SIZE * index,
                          _DESCRIPTOR.pack(addr, length, flags, next_index))

    def add_chain(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Descriptors for (addr, len, device-writable) buffers; returns the head."""
        indices = [(self._next_desc + i) % self.size for i in range(len(buffers))]
        self._next_desc = (self._next_desc + len(buffers)) % self.size
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.write_descriptor(indices[i], addr, length, flags, 0 if last else indices[i + 1])
        self.publish(indices[0])
        return indices[0]

    def add_indirect(self, table_addr: int, buffers: list[tuple[int, int, bool]]) -> int:
        """One descriptor pointing at an indirect table written at ``table_addr``."""
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.write_descriptor(i, addr, length, flags, 0 if last else i + 1, table=table_addr)
        head = self._next_desc
        self._next_desc = (head + 1) % self.size
        self.write_descriptor(head, table_addr, DESCRIPTOR_SIZE * len(buffers), DESC_F_INDIRECT)
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail_addr + 4 + 2 * self.size, value)

    def set_avail_flags(self, value: int) -> None:
        self.memory.write_u16(self.avail_addr, value)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + 2)

    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_addr + 4 + 8 * self.size)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written length) of the chains the device returned since the last call."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            out.append(struct.unpack_from("<II", self.memory.read(self.used_addr + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class PciDriver:
    """Programs a VirtioPciDevice through its BAR, like Linux's virtio_pci_modern."""

    COMMON = 0x0000

    def __init__(self, function):
        self.function = function
        self.bar = function.bar_devices[0]

    def read(self, offset: int, size: int) -> int:
        return self.bar.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.bar.write(offset, size, value)

    def device_features(self) -> int:
        self.write(0x00, 4, 0)
        low = self.read(0x04, 4)
        self.write(0x00, 4, 1)
        return self.read(0x04, 4) << 32 | low

    def negotiate(self, features: int) -> int:
        """ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back."""
        self.write(0x14, 1, 0)
        self.write(0x14, 1, 1)
        self.write(0x14, 1, 3)
        for select in (0, 1):
            self.write(0x08, 4, select)
            self.write(0x0C, 4, (features >> 32 * select) & 0xFFFFFFFF)
        self.write(0x14, 1, 3 | 8)
        return self.read(0x14, 1)

    def setup_queue(self, index: int, ring: DriverRing, vector: int = 0xFFFF) -> None:
        self.write(0x16, 2, index)
        self.write(0x18, 2, ring.size)
        self.write(0x1A, 2, vector)
        for offset, addr in ((0x20, ring.desc_addr), (0x28, ring.avail_addr), (0x30, ring.used_addr)):
            self.write(offset, 4, addr & 0xFFFFFFFF)
            self.write(offset + 4, 4, addr >> 32)
        self.write(0x1C, 2, 1)

    def driver_ok(self) -> None:
        self.write(0x14, 1, self.read(0x14, 1) | 4)

    def status(self) -> int:
        return self.read(0x14, 1)

    def notify(self, index: int) -> None:
        self.write(0x3000 + 4 * index, 2, index)


class MmioDriver:
    """Programs a VirtioMmioDevice through its register page, like Linux's virtio_mmio
    (32-bit accesses only, virtio 1.2 4.2.2.2); the same methods as :class:`PciDriver`."""

    def __init__(self, transport):
        self.transport = transport

    def read(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def write(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value & 0xFFFFFFFF)

    def device_features(self) -> int:
        self.write(0x014, 0)
        low = self.read(0x010)
        self.write(0x014, 1)
        return self.read(0x010) << 32 | low

    def negotiate(self, features: int) -> int:
        """ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back."""
        for status in (0, 1, 3):
            self.write(0x070, status)
        for select in (0, 1):
            self.write(0x024, select)
            self.write(0x020, features >> 32 * select)
        self.write(0x070, 3 | 8)
        return self.read(0x070)

    def setup_queue(self, index: int, ring: DriverRing) -> None:
        self.write(0x030, index)
        self.write(0x038, ring.size)
        for offset, addr in ((0x080, ring.desc_addr), (0x090, ring.avail_addr),
                             (0x0A0, ring.used_addr)):
            self.write(offset, addr)
            self.write(offset + 4, addr >> 32)
        self.write(0x044, 1)

    def driver_ok(self) -> None:
        self.write(0x070, self.read(0x070) | 4)

    def status(self) -> int:
        return self.read(0x070)

    def acknowledge(self) -> int:
        """Read InterruptStatus and write it back to InterruptACK, as vm_interrupt does."""
        pending = self.read(0x060)
        self.write(0x064, pending)
        return pending

    def notify(self, index: int) -> None:
        self.write(0x050, index)


class RecordingLine:
    """An interrupt line that counts what a device raised (an irqfd or INTx stand-in)."""

    def __init__(self, gsi: int = 0):
        self.gsi = gsi
        self.triggered = 0
        self.level = False

    def trigger(self) -> None:
        self.triggered += 1

    def set_level(self, high: bool) -> None:
        self.level = high
        if high:
            self.triggered += 1

    def pulse(self) -> None:
        self.trigger()

    def close(self) -> None:
        pass


class StandInVm:
    """Enough of a Vm for device tests without /dev/kvm: buses, eventfds, and an
    ioeventfd table that :meth:`mmio_write` consults as KVM would."""

    def __init__(self, memory: GuestMemory):
        self.memory = memory
        self.pio_bus, self.mmio_bus = PioBus(), MmioBus()
        self.ioeventfds: dict[tuple[int, int], int] = {}
        self.lines: dict[int, RecordingLine] = {}
        self._fds: list[int] = []
        self._closers: list = []
        self.fd = -1

    def new_eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        return fd

    def add_ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False,
                      datamatch: int | None = None, deassign: bool = False) -> None:
        if deassign:
            del self.ioeventfds[(addr, length)]
        else:
            self.ioeventfds[(addr, length)] = fd

    def add_irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        pass

    def irq_line(self, gsi: int) -> RecordingLine:
        return self.lines.setdefault(gsi, RecordingLine(gsi))

    def add_pio_device(self, base: int, length: int, device) -> None:
        self.pio_bus.register(base, length, device)

    def add_mmio_device(self, base: int, length: int, device) -> None:
        if self.memory.contains(base) or self.memory.contains(base + length - 1):
            raise PykvmError(f"MMIO range {base:#x}+{length:#x} overlaps RAM")
        self.mmio_bus.register(base, length, device)

    def on_close(self, closer) -> None:
        self._closers.append(closer)

    # --- what a vCPU's exits would do ------------------------------------------------------
    def mmio_write(self, addr: int, size: int, value: int) -> None:
        fd = self.ioeventfds.get((addr, size))
        if fd is not None:
            os.eventfd_write(fd, 1)
            return
        mapping = self.mmio_bus.find(addr)
        if mapping is not None:
            mapping.device.write(addr - mapping.base, size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        mapping = self.mmio_bus.find(addr)
        return (1 << 8 * size) - 1 if mapping is None else \
            mapping.device.read(addr - mapping.base, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        device, offset = self.pio_bus.ports.get(port, (None, 0))
        if device is not None:
            device.write(offset, size, value)

    def pio_read(self, port: int, size: int) -> int:
        device, offset = self.pio_bus.ports.get(port, (None, 0))
        return (1 << 8 * size) - 1 if device is None else device.read(offset, size)

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        self._closers.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
