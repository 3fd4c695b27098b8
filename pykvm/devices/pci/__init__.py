"""PCI: bus 0 behind configuration mechanism #1, config spaces, BARs and MSI-X."""

from .bus import PciBus
from .config import Bar, ConfigSpace
from .device import PciDevice, RegionMap
from .msix import MsixTable

__all__ = ["PciBus", "Bar", "ConfigSpace", "PciDevice", "RegionMap", "MsixTable"]
