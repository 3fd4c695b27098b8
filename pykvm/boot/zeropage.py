"""struct boot_params, the "zero page": what the boot loader tells Linux.

Layout from Documentation/arch/x86/zero-page.rst (boot_params' own fields)
and boot.rst (the setup header ``hdr`` inside it, at 0x1f1; its offsets are
in bzimage.py because they are the same in the kernel file). With the 64-bit
boot protocol the kernel finds this page through RSI.
"""

from __future__ import annotations

import struct

from ..errors import ConfigError
from ..memory import GuestMemory
from . import bzimage as hdr
from .e820 import E820Entry

ZERO_PAGE_SIZE = 4096

# --- boot_params fields outside the setup header (zero-page.rst name, size) ------------
ACPI_RSDP_ADDR = 0x070      # acpi_rsdp_addr, u64: physical address of the ACPI RSDP (0: let Linux scan)
EXT_RAMDISK_IMAGE = 0x0C0   # ext_ramdisk_image, u32: ramdisk_image high 32 bits
EXT_RAMDISK_SIZE = 0x0C4    # ext_ramdisk_size, u32: ramdisk_size high 32 bits
EXT_CMD_LINE_PTR = 0x0C8    # ext_cmd_line_ptr, u32: cmd_line_ptr high 32 bits
E820_ENTRIES = 0x1E8        # e820_entries, u8: number of entries in e820_table
E820_TABLE = 0x2D0          # e820_table: struct boot_e820_entry[128], packed {u64 addr, u64 size, u32 type}
E820_ENTRY = struct.Struct("<QQI")
E820_MAX_ENTRIES = 128      # E820_MAX_ENTRIES_ZEROPAGE: 0xa00 bytes / 20

# What pykvm writes into the header (boot.rst "obligatory" fields).
SYNTHETIC_PROTOCOL = 0x020F  # the header pykvm makes up for a bare vmlinux claims protocol 2.15
VID_MODE_NORMAL = 0xFFFF     # "normal": no video mode change
LOADER_UNDEFINED = 0xFF      # type_of_loader for a loader without an assigned id
HEAP_END = 0xE000            # boot.rst's sample layout: the setup heap ends 0xe000 into its segment
# A bare vmlinux declares no alignment: x86-64's default CONFIG_PHYSICAL_ALIGN, as Debian's bzImages declare.
DEFAULT_KERNEL_ALIGNMENT = 0x200000


class ZeroPage:
    """A boot_params page being filled in; ``bytes()`` gives the 4096 bytes to place in guest RAM."""

    def __init__(self, setup_header: bytes | None = None):
        """``setup_header``: a bzImage's header bytes from 0x1f1 (``SetupHeader.raw``);
        None for a bare vmlinux, which has none, so one is made up."""
        self.data = bytearray(ZERO_PAGE_SIZE)
        if setup_header is not None:
            self.data[hdr.SETUP_SECTS:hdr.SETUP_SECTS + len(setup_header)] = setup_header
        else:
            self._put("<H", hdr.BOOT_FLAG, hdr.BOOT_FLAG_MAGIC)
            self.data[hdr.HEADER:hdr.HEADER + 4] = hdr.HDRS_MAGIC
            self._put("<H", hdr.VERSION, SYNTHETIC_PROTOCOL)
            self._put("<B", hdr.LOADFLAGS, hdr.LOADED_HIGH)
            self._put("<I", hdr.KERNEL_ALIGNMENT, DEFAULT_KERNEL_ALIGNMENT)
        self._put("<H", hdr.VID_MODE, VID_MODE_NORMAL)
        self._put("<B", hdr.TYPE_OF_LOADER, LOADER_UNDEFINED)
        self._put("<B", hdr.LOADFLAGS, self.data[hdr.LOADFLAGS] | hdr.CAN_USE_HEAP)
        self._put("<H", hdr.HEAP_END_PTR, HEAP_END - 0x200)

    def _put(self, fmt: str, offset: int, value: int) -> None:
        struct.pack_into(fmt, self.data, offset, value)

    def _put_split(self, low_offset: int, high_offset: int, value: int) -> None:
        """A 64-bit value kept as a 32-bit header field plus its ext_ high half."""
        self._put("<I", low_offset, value & 0xFFFFFFFF)
        self._put("<I", high_offset, value >> 32)

    def set_cmdline(self, address: int) -> None:
        self._put_split(hdr.CMD_LINE_PTR, EXT_CMD_LINE_PTR, address)

    def set_initrd(self, address: int, size: int) -> None:
        self._put_split(hdr.RAMDISK_IMAGE, EXT_RAMDISK_IMAGE, address)
        self._put_split(hdr.RAMDISK_SIZE, EXT_RAMDISK_SIZE, size)

    def set_code32_start(self, address: int) -> None:
        """Where the protected-mode code was loaded, for a bzImage not at 1 MiB."""
        self._put("<I", hdr.CODE32_START, address)

    def set_e820(self, entries: list[E820Entry]) -> None:
        if len(entries) > E820_MAX_ENTRIES:
            raise ConfigError(f"e820 map has {len(entries)} entries; the zero page holds {E820_MAX_ENTRIES}")
        self.data[E820_TABLE:E820_TABLE + E820_MAX_ENTRIES * E820_ENTRY.size] = \
            bytes(E820_MAX_ENTRIES * E820_ENTRY.size)
        for index, entry in enumerate(entries):
            E820_ENTRY.pack_into(self.data, E820_TABLE + index * E820_ENTRY.size,
                                 entry.addr, entry.size, int(entry.type))
        self._put("<B", E820_ENTRIES, len(entries))

    def set_acpi_rsdp(self, address: int) -> None:
        self._put("<Q", ACPI_RSDP_ADDR, address)

    def __bytes__(self) -> bytes:
        return bytes(self.data)


def set_acpi_rsdp(memory: GuestMemory, zero_page_addr: int, rsdp_addr: int) -> None:
    """Point an already written zero page at the ACPI RSDP (for tables built after the kernel is loaded)."""
    memory.write_u64(zero_page_addr + ACPI_RSDP_ADDR, rsdp_addr)
