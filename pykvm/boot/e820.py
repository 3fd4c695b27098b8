"""The e820 memory map: what a PC BIOS would tell the guest about its RAM.

Linux takes its memory layout from this table (boot_params.e820_table), so
every byte it may use must be RAM here, and the low-memory areas where pykvm
puts the MP table, ACPI tables and BIOS-ish data must be reserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from ..errors import ConfigError
from ..layout import EBDA_START, HIGH_RAM_START, KiB, ram_ranges


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3  # ACPI tables the OS may reclaim once it has read them


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(mem_size: int) -> list[E820Entry]:
    """The map for a guest of ``mem_size`` bytes laid out by ``layout.ram_ranges``.

    Base memory up to the EBDA is RAM; [EBDA, 1 MiB) is reserved (EBDA and MP
    table, the VGA hole, the BIOS area holding the ACPI RSDP); RAM resumes at
    1 MiB up to the PCI hole, and whatever did not fit below it sits above 4 GiB.
    """
    if mem_size <= HIGH_RAM_START:
        raise ConfigError(f"guest RAM of {mem_size // KiB} KiB is too small for an e820 map"
                          f" (it needs more than {HIGH_RAM_START // KiB} KiB)")
    (low_start, low_size), *high_ranges = ram_ranges(mem_size)
    entries = [
        E820Entry(low_start, EBDA_START - low_start, E820Type.RAM),
        E820Entry(EBDA_START, HIGH_RAM_START - EBDA_START, E820Type.RESERVED),
        E820Entry(HIGH_RAM_START, low_start + low_size - HIGH_RAM_START, E820Type.RAM),
    ]
    entries += [E820Entry(start, size, E820Type.RAM) for start, size in high_ranges]
    return entries
