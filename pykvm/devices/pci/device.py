"""What the PCI bus needs from a function: its config space, what answers in
each memory BAR, and hooks for when a BAR appears at or leaves an address."""

from __future__ import annotations

import bisect

from ...bus import Device, IrqLine
from .config import ConfigSpace


class PciDevice:
    """Base of a PCI function. Subclasses fill :attr:`config` and :attr:`bar_devices`."""

    name = "pci-device"

    def __init__(self, config: ConfigSpace):
        self.config = config
        self.bar_devices: dict[int, Device] = {}   # BAR index -> what answers accesses in it
        self.intx: IrqLine | None = None           # given by the bus when it places the device

    def bar_mapped(self, index: int, address: int) -> None:
        """The BAR now decodes at ``address`` (memory decoding on, address valid)."""

    def bar_unmapped(self, index: int, address: int) -> None:
        """The BAR no longer decodes at ``address``."""

    def config_written(self, offset: int, size: int) -> None:
        """Any guest write to config space, after the masks were applied."""

    def close(self) -> None:
        """Release threads and fds (the bus calls it when the VM closes)."""


class RegionMap(Device):
    """A BAR cut into sub-regions, each its own device (offset relative to it).
    Accesses that hit no region read as zero and are ignored."""

    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []
        self._regions: list[tuple[int, int, Device]] = []

    def add(self, offset: int, length: int, device: Device) -> None:
        index = bisect.bisect_right(self._starts, offset)
        self._starts.insert(index, offset)
        self._regions.insert(index, (offset, length, device))

    def _find(self, offset: int) -> tuple[int, Device] | None:
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0:
            start, length, device = self._regions[index]
            if offset < start + length:
                return offset - start, device
        return None

    def read(self, offset: int, size: int) -> int:
        found = self._find(offset)
        return 0 if found is None else found[1].read(found[0], size)

    def write(self, offset: int, size: int, value: int) -> None:
        found = self._find(offset)
        if found is not None:
            found[1].write(found[0], size, value)
