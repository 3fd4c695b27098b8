"""Buses: guest address ranges -> device objects.

A VM has two: the port-I/O bus (16-bit port numbers) and the MMIO bus
(guest-physical addresses outside RAM). A device registers one or more ranges
and is called with the offset *within* its range, so it never needs to know
where it was placed (kvmtool and rust-vmm do the same).

Port I/O is the hot path of every legacy device, so the PIO bus keeps a
per-port dictionary: one hash lookup per exit, whatever the number of devices.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

from .errors import ConfigError


class Device:
    """What a bus dispatches to. Subclasses override :meth:`read`/:meth:`write`.

    ``size`` is the access width in bytes (1, 2, 4 or 8); values are unsigned
    little-endian integers of that width. A device must never raise for guest
    input: garbage in means a logged, counted no-op, never a crashed VMM.
    """

    name = "device"

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class IrqLine:
    """The one thing a device knows about interrupts: a line it can raise.

    The VM provides the implementation (KVM_IRQ_LINE or an irqfd); device logic
    stays testable with a fake that records calls.
    """

    def set_level(self, high: bool) -> None:
        raise NotImplementedError

    def pulse(self) -> None:
        """An edge: raise then lower (ISA-style edge-triggered interrupt)."""
        self.set_level(True)
        self.set_level(False)


@dataclass(frozen=True)
class Mapping:
    base: int
    length: int
    device: Device

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Sorted, non-overlapping ranges. Lookup is a bisect over range starts."""

    def __init__(self, name: str):
        self.name = name
        self._mappings: list[Mapping] = []
        self._starts: list[int] = []
        self._lock = threading.Lock()

    def register(self, base: int, length: int, device: Device) -> None:
        if length <= 0:
            raise ConfigError(f"{self.name}: empty range for {device.name}")
        with self._lock:
            index = bisect.bisect_right(self._starts, base)
            neighbours = self._mappings[max(index - 1, 0):index + 1]
            for other in neighbours:
                if base < other.end and other.base < base + length:
                    raise ConfigError(
                        f"{self.name}: {device.name} at {base:#x}+{length:#x} overlaps "
                        f"{other.device.name} at {other.base:#x}+{other.length:#x}")
            self._mappings.insert(index, Mapping(base, length, device))
            self._starts.insert(index, base)
            self._changed()

    def unregister(self, base: int) -> None:
        with self._lock:
            index = bisect.bisect_left(self._starts, base)
            if index < len(self._starts) and self._starts[index] == base:
                del self._mappings[index]
                del self._starts[index]
                self._changed()

    def find(self, addr: int) -> Mapping | None:
        index = bisect.bisect_right(self._starts, addr) - 1
        if index >= 0:
            mapping = self._mappings[index]
            if addr < mapping.end:
                return mapping
        return None

    def mappings(self) -> list[Mapping]:
        return list(self._mappings)

    def _changed(self) -> None:
        """Hook for subclasses that keep a faster index."""


class PioBus(Bus):
    """The 64 KiB port space, with a port -> (device, offset) dictionary."""

    def __init__(self):
        super().__init__("pio")
        self.ports: dict[int, tuple[Device, int]] = {}

    def _changed(self) -> None:
        ports = {}
        for mapping in self._mappings:
            for port in range(mapping.base, mapping.end):
                ports[port] = (mapping.device, port - mapping.base)
        self.ports = ports  # swapped whole: vCPU threads read it without the lock


class MmioBus(Bus):
    def __init__(self):
        super().__init__("mmio")
