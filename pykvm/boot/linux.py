"""Put a Linux kernel, its command line, initrd and zero page into guest RAM.

This is the 64-bit boot protocol (boot.rst, "64-bit Boot Protocol") seen from
the loader's side: the vCPU then starts in long mode at ``LinuxBoot.entry``
with RSI = ``LinuxBoot.boot_params_addr`` (register and page-table set-up is
modes.py's job, not this module's).

A bzImage is by default not entered through its decompressor: its ELF vmlinux
is extracted (and cached) in pykvm and loaded like a bare vmlinux, because
guest ring-0 code may be emulated and slow (docs/hosts.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import ConfigError, ImageError
from ..layout import (CMDLINE_ADDR, CMDLINE_MAX, KERNEL_LOAD_ADDR, PAGE_SIZE, PCI_HOLE_START,
                      ZERO_PAGE_ADDR, MiB)
from ..memory import GuestMemory
from .bzimage import BzImage, SetupHeader, has_setup_header, read_image_file
from .e820 import e820_map
from .elf import is_elf, load_elf
from .initrd import decompressed
from .payload import extract_vmlinux
from .zeropage import ZeroPage

# initrd_addr_max that x86-64 kernels declare; the limit for a bare vmlinux, which has no header.
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF
# The 64-bit entry point of a bzImage's protected-mode code (boot.rst: "start address ... plus 0x200").
BZIMAGE_ENTRY_64_OFFSET = 0x200


@dataclass(frozen=True)
class LinuxBoot:
    """Where the loaded kernel starts and what it was given."""

    entry: int               # physical RIP of the 64-bit entry point
    boot_params_addr: int    # the zero page; goes in RSI
    kernel_end: int          # one past the last byte the kernel occupies
    initrd_addr: int         # 0 when there is no initrd
    initrd_size: int
    kind: str                # "vmlinux" | "bzimage" | "bzimage-extracted"
    release: str | None      # e.g. "6.1.0-18-amd64", from a bzImage's header


@dataclass(frozen=True)
class _LoadedKernel:
    entry: int
    end: int
    kind: str
    header: SetupHeader | None = None
    release: str | None = None
    protected_mode_addr: int | None = None  # set when a bzImage's own code was loaded


def load_linux(memory: GuestMemory, kernel_path: str | os.PathLike,
               initrd: bytes | str | os.PathLike | None = None, cmdline: str = "",
               extract: bool = True) -> LinuxBoot:
    """Load the kernel at ``kernel_path`` (bzImage or ELF vmlinux) and everything it boots with.

    ``initrd`` is its content or a path to it. With ``extract`` False a bzImage
    runs its own decompressor.
    """
    kernel = _load_kernel(memory, kernel_path, extract)
    zero_page = ZeroPage(kernel.header.raw if kernel.header else None)
    if kernel.protected_mode_addr is not None:
        zero_page.set_code32_start(kernel.protected_mode_addr)

    _write_cmdline(memory, cmdline, kernel.header)
    zero_page.set_cmdline(CMDLINE_ADDR)

    initrd_addr = initrd_size = 0
    if initrd is not None:
        # Decompressed here, not by the guest (initrd.py): minutes where ring 0 is emulated.
        content = decompressed(_initrd_content(initrd), memory.size // INITRD_RAM_SHARE)
        initrd_addr_max = kernel.header.initrd_addr_max if kernel.header else DEFAULT_INITRD_ADDR_MAX
        initrd_addr = place_initrd(memory, len(content), kernel.end, initrd_addr_max)
        initrd_size = len(content)
        memory.write(initrd_addr, content)
        zero_page.set_initrd(initrd_addr, initrd_size)

    zero_page.set_e820(e820_map(memory.size))
    memory.write(ZERO_PAGE_ADDR, bytes(zero_page))
    return LinuxBoot(entry=kernel.entry, boot_params_addr=ZERO_PAGE_ADDR, kernel_end=kernel.end,
                     initrd_addr=initrd_addr, initrd_size=initrd_size, kind=kernel.kind,
                     release=kernel.release)


def _load_kernel(memory: GuestMemory, kernel_path: str | os.PathLike, extract: bool) -> _LoadedKernel:
    name = os.fspath(kernel_path)
    data = read_image_file(kernel_path, "kernel")
    if is_elf(data):
        elf = load_elf(memory, data, name)
        return _LoadedKernel(elf.entry, elf.end, "vmlinux")
    if not has_setup_header(data):
        raise ImageError(f"{name}: not a Linux kernel image (neither bzImage nor ELF vmlinux)")
    image = BzImage(data, name)
    if extract:
        elf = load_elf(memory, extract_vmlinux(image), name)
        return _LoadedKernel(elf.entry, elf.end, "bzimage-extracted", image.header, image.release)
    address, end = _load_protected_mode(memory, image)
    return _LoadedKernel(address + BZIMAGE_ENTRY_64_OFFSET, end, "bzimage", image.header, image.release,
                         protected_mode_addr=address)


def _load_protected_mode(memory: GuestMemory, image: BzImage) -> tuple[int, int]:
    """Place the bzImage's protected-mode code (decompressor + payload); its (address, end).

    It decompresses the kernel in place, so it needs ``init_size`` bytes from
    its load address, not just its own length.
    """
    header = image.header
    address = header.pref_address or KERNEL_LOAD_ADDR
    if header.relocatable_kernel and header.kernel_alignment:
        address = _align_up(address, header.kernel_alignment)
    code = image.protected_mode
    end = address + max(header.init_size, len(code))
    if not memory.contains(address, end - address):
        raise ImageError(f"{image.name}: kernel does not fit in {memory.size // MiB} MiB of guest RAM"
                         f" (it needs {address:#x}-{end:#x})")
    memory.write(address, code)
    return address, end


def _write_cmdline(memory: GuestMemory, cmdline: str, header: SetupHeader | None) -> None:
    encoded = cmdline.encode()
    limit = CMDLINE_MAX - 1  # room for the NUL
    if header is not None:
        limit = min(limit, header.cmdline_size)
    if b"\0" in encoded:
        raise ConfigError("kernel command line contains a NUL character")
    if len(encoded) > limit:
        raise ConfigError(f"kernel command line is {len(encoded)} bytes; this kernel accepts at most {limit}")
    memory.write(CMDLINE_ADDR, encoded + b"\0")


INITRD_RAM_SHARE = 4     # a decompressed initramfs may take at most 1/4 of guest RAM


def _initrd_content(initrd: bytes | str | os.PathLike) -> bytes:
    if isinstance(initrd, (bytes, bytearray, memoryview)):
        if not len(initrd):
            raise ImageError("initrd is empty")
        return bytes(initrd)
    return read_image_file(initrd, "initrd")


def place_initrd(memory: GuestMemory, size: int, kernel_end: int, initrd_addr_max: int) -> int:
    """The page-aligned address for an initrd of ``size`` bytes, as high as the kernel allows.

    High, to stay clear of what the kernel uses just past its image (bss, brk,
    early page tables, the decompressor's buffer); below the PCI hole and
    below ``initrd_addr_max`` (the highest byte the kernel accepts for it).
    """
    ceiling = min(initrd_addr_max + 1, PCI_HOLE_START)
    floor = _align_up(kernel_end, PAGE_SIZE)
    for region in reversed(memory.regions):
        top = min(region.end, ceiling)
        address = _align_down(top - size, PAGE_SIZE)
        if address >= max(region.guest_addr, floor):
            return address
    raise ImageError(f"initrd of {size / MiB:.1f} MiB does not fit in guest RAM of {memory.size // MiB} MiB"
                     f" (it must lie between the kernel's end at {floor:#x} and {ceiling:#x})")


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment
