"""A bzImage's setup header: read it, check that pykvm can boot it, expose its fields.

Offsets and field names are those of the Linux/x86 boot protocol
(Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header"). pykvm only
uses the 64-bit boot protocol, so it needs protocol 2.12 or later, where
``xloadflags`` says whether the kernel has a 64-bit entry point.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..errors import ImageError
from ..images import read_image_file, read_image_head

# --- setup header offsets (boot.rst name, size) -----------------------------------
# The same offsets hold in the kernel file and in struct boot_params (the zero
# page), where a loader copies the header.
SETUP_SECTS = 0x1F1         # setup_sects, u8: setup code size in 512-byte sectors (0 means 4)
VID_MODE = 0x1FA            # vid_mode, u16 (write): 0xffff = "normal"
BOOT_FLAG = 0x1FE           # boot_flag, u16: 0xAA55
JUMP = 0x200                # jump, u16: 0xEB, then the header's length: it ends at 0x202 + byte 0x201
HEADER = 0x202              # header, u32: "HdrS"
VERSION = 0x206             # version, u16: protocol version, (major << 8) + minor
KERNEL_VERSION = 0x20E      # kernel_version, u16: offset of the version string, less 0x200
TYPE_OF_LOADER = 0x210      # type_of_loader, u8 (write): 0xff = a loader without an assigned id
LOADFLAGS = 0x211           # loadflags, u8
CODE32_START = 0x214        # code32_start, u32 (write when loading elsewhere than 1 MiB)
RAMDISK_IMAGE = 0x218       # ramdisk_image, u32 (write): initrd address, low 32 bits
RAMDISK_SIZE = 0x21C        # ramdisk_size, u32 (write): initrd size, low 32 bits
HEAP_END_PTR = 0x224        # heap_end_ptr, u16 (write): end of the setup heap, less 0x200
CMD_LINE_PTR = 0x228        # cmd_line_ptr, u32 (write): command line address, low 32 bits
INITRD_ADDR_MAX = 0x22C     # initrd_addr_max, u32: highest byte an initrd may occupy (2.03+)
KERNEL_ALIGNMENT = 0x230    # kernel_alignment, u32 (2.05+)
RELOCATABLE_KERNEL = 0x234  # relocatable_kernel, u8 (2.05+)
XLOADFLAGS = 0x236          # xloadflags, u16 (2.12+)
CMDLINE_SIZE = 0x238        # cmdline_size, u32: longest command line without its NUL (2.06+)
PAYLOAD_OFFSET = 0x248      # payload_offset, u32: from the start of the protected-mode code (2.08+)
PAYLOAD_LENGTH = 0x24C      # payload_length, u32 (2.08+)
PREF_ADDRESS = 0x258        # pref_address, u64 (2.10+)
INIT_SIZE = 0x260           # init_size, u32: memory the kernel needs from its load address (2.10+)

LOADED_HIGH = 1 << 0        # loadflags: the protected-mode code is loaded at 1 MiB or above
CAN_USE_HEAP = 1 << 7       # loadflags: heap_end_ptr is valid
BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = b"HdrS"
SECTOR_SIZE = 512
DEFAULT_SETUP_SECTS = 4     # "If this field is 0, the real value is 4."
MAX_SETUP_SIZE = (255 + 1) * SECTOR_SIZE   # setup_sects is one byte, plus the boot sector
MIN_PROTOCOL = 0x020C       # 2.12: the first protocol with xloadflags
XLF_KERNEL_64 = 1 << 0      # the kernel has the 64-bit entry point at load address + 0x200

# Every field pykvm reads lies before INIT_SIZE + 4, which protocol 2.12
# headers always include; the header must end before boot_params' next field
# (edd_mbr_sig_buffer at 0x290), since loaders copy it there.
MIN_HEADER_END = INIT_SIZE + 4
MAX_HEADER_END = 0x290


def protocol_text(version: int) -> str:
    """A protocol version as boot.rst writes it: 0x020f -> "2.15"."""
    return f"{version >> 8}.{version & 0xFF:02d}"


def has_setup_header(data: bytes) -> bool:
    """True if ``data`` carries the "HdrS" magic of a boot-protocol 2.00+ kernel."""
    return data[HEADER:HEADER + 4] == HDRS_MAGIC


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header that pykvm reads."""

    setup_sects: int
    version: int
    loadflags: int
    kernel_version_offset: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int
    cmdline_size: int
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int
    raw: bytes  # the header bytes from 0x1f1 to its end, to copy into the zero page

    @property
    def version_text(self) -> str:
        return protocol_text(self.version)

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode code: the boot sector plus the setup sectors."""
        return (self.setup_sects + 1) * SECTOR_SIZE


class BzImage:
    """A validated bzImage with a 64-bit entry point."""

    def __init__(self, data: bytes, name: str = "bzImage"):
        self.name = name
        self.data = data
        self.header = _parse_header(data, name)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BzImage":
        return cls(read_image_file(path), os.fspath(path))

    @property
    def protected_mode(self) -> memoryview:
        """The 32/64-bit kernel: what a loader places at the load address."""
        return memoryview(self.data)[self.header.setup_size:]

    @property
    def payload(self) -> memoryview:
        """The compressed vmlinux inside the protected-mode code."""
        start = self.header.payload_offset
        return self.protected_mode[start:start + self.header.payload_length]

    @property
    def version_string(self) -> str | None:
        """The version string in the setup code: "6.1.0-18-amd64 (debian-kernel@...) #1 SMP ..."."""
        return _version_at(self.data, self.header.kernel_version_offset, self.header.setup_size)

    @property
    def release(self) -> str | None:
        """The release as ``uname -r`` prints it: the version string's first word."""
        version = self.version_string
        return version.split()[0] if version and version.split() else None


def _parse_header(data: bytes, name: str) -> SetupHeader:
    if not data:
        raise ImageError(f"{name}: kernel image is empty")
    if len(data) < HEADER + 4:
        raise ImageError(f"{name}: not a bzImage (only {len(data)} bytes, too short for a setup header)")
    if not has_setup_header(data):
        raise ImageError(f"{name}: not a bzImage (no HdrS magic)")
    boot_flag, = struct.unpack_from("<H", data, BOOT_FLAG)
    if boot_flag != BOOT_FLAG_MAGIC:
        raise ImageError(f"{name}: not a bzImage (boot flag is {boot_flag:#06x}, not 0xaa55)")
    header_end = HEADER + data[JUMP + 1]
    if len(data) < max(header_end, VERSION + 2):
        raise ImageError(f"{name}: truncated bzImage (the setup header runs past its {len(data)} bytes)")
    version, = struct.unpack_from("<H", data, VERSION)
    if version < MIN_PROTOCOL:
        raise ImageError(f"{name}: boot protocol {protocol_text(version)} is too old"
                         " (pykvm needs 2.12 or later for the 64-bit entry point)")
    if not MIN_HEADER_END <= header_end <= MAX_HEADER_END:
        raise ImageError(f"{name}: setup header length {header_end - SETUP_SECTS} bytes is impossible"
                         f" for protocol {protocol_text(version)}")
    xloadflags, = struct.unpack_from("<H", data, XLOADFLAGS)
    if not xloadflags & XLF_KERNEL_64:
        raise ImageError(f"{name}: has no 64-bit entry point (xloadflags bit XLF_KERNEL_64 is clear;"
                         " a 32-bit kernel?)")
    header = SetupHeader(
        setup_sects=data[SETUP_SECTS] or DEFAULT_SETUP_SECTS,
        version=version,
        loadflags=data[LOADFLAGS],
        kernel_version_offset=struct.unpack_from("<H", data, KERNEL_VERSION)[0],
        initrd_addr_max=struct.unpack_from("<I", data, INITRD_ADDR_MAX)[0],
        kernel_alignment=struct.unpack_from("<I", data, KERNEL_ALIGNMENT)[0],
        relocatable_kernel=bool(data[RELOCATABLE_KERNEL]),
        xloadflags=xloadflags,
        cmdline_size=struct.unpack_from("<I", data, CMDLINE_SIZE)[0],
        payload_offset=struct.unpack_from("<I", data, PAYLOAD_OFFSET)[0],
        payload_length=struct.unpack_from("<I", data, PAYLOAD_LENGTH)[0],
        pref_address=struct.unpack_from("<Q", data, PREF_ADDRESS)[0],
        init_size=struct.unpack_from("<I", data, INIT_SIZE)[0],
        raw=bytes(data[SETUP_SECTS:header_end]),
    )
    _check_extent(header, len(data), name)
    return header


def _check_extent(header: SetupHeader, file_size: int, name: str) -> None:
    """The setup code and the payload must lie inside the file."""
    needed = header.setup_size
    if header.payload_length:
        needed += header.payload_offset + header.payload_length
    if file_size < needed:
        raise ImageError(f"{name}: truncated bzImage (file has {file_size} bytes,"
                         f" its setup header says at least {needed})")
    if file_size == header.setup_size:
        raise ImageError(f"{name}: truncated bzImage (no protected-mode code after the setup sectors)")


def version_of_file(path: str | os.PathLike) -> str | None:
    """The version string of the bzImage at ``path`` (boot.rst, kernel_version), read from
    its setup code alone; None for anything else (an ELF vmlinux, a flat binary, a file
    that is not a regular one) or a header that does not hold one. What pykvm's quirks
    tell kernels apart by. The read goes through images.py's checks (a FIFO given as the
    kernel must not block here, before the loader reports it)."""
    try:
        head = read_image_head(path, MAX_SETUP_SIZE)
    except ImageError:
        return None
    if len(head) < HEADER + 4 or head[HEADER:HEADER + 4] != HDRS_MAGIC:
        return None
    head = head[:((head[SETUP_SECTS] or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE]
    return _version_at(head, struct.unpack_from("<H", head, KERNEL_VERSION)[0], len(head))


def _version_at(data: bytes, offset: int, setup_size: int) -> str | None:
    """The NUL-terminated version string the kernel_version field points at."""
    if not offset:
        return None
    start = offset + 0x200  # the field holds the string's file offset less 0x200
    if start >= setup_size:
        return None  # boot.rst: a valid pointer lies inside the setup code
    end = data.find(b"\0", start, setup_size)
    if end < 0:
        return None
    return data[start:end].decode("ascii", errors="replace") or None
