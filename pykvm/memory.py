"""Guest RAM: memfd-backed (or, for a restored snapshot, file-backed) mmap
regions, reached only through bounds-checked guest-physical addresses.

A fresh VM's RAM is one sealed memfd mapped MAP_SHARED, region by region at
increasing file offsets: still one mmap per region and zero-copy for pykvm's
own devices, and shareable, because a vhost-user back end (virtiofsd,
qemu-storage-daemon: pykvm/vhost_user) maps the same pages from the fd it gets
with SET_MEM_TABLE. The memfd is sealed against shrinking and growing, so a
back end cannot truncate it under pykvm (which would turn guest RAM accesses
into SIGBUS). Like anonymous memory its pages are allocated on first touch.

Like rust-vmm's vm-memory, nothing here hands out raw host pointers to device
code: devices get memoryviews that cover exactly the range they asked for, and
every address and length a guest supplies is checked before it is used.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass, field

from .errors import GuestMemoryError, HostResourceError
from .layout import PAGE_SIZE, ram_ranges


@dataclass
class MemoryRegion:
    """One contiguous range of guest RAM backed by one host mapping."""

    guest_addr: int
    size: int
    mapping: mmap.mmap
    file_offset: int = 0                # where the region starts in GuestMemory.fd
    host_addr: int = field(init=False)
    view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        anchor = ctypes.c_char.from_buffer(self.mapping)
        self.host_addr = ctypes.addressof(anchor)
        del anchor  # the address stays valid while the mapping is open
        self.view = memoryview(self.mapping)

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    def contains(self, gpa: int, length: int) -> bool:
        return self.guest_addr <= gpa and gpa + length <= self.end

    def close(self) -> None:
        self.view.release()
        try:
            self.mapping.close()
        except BufferError:
            # A device still holds a view; the mapping goes when that view does.
            pass


def host_ram_size() -> int:
    """This host's physical RAM in bytes (0 when the kernel does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def check_fits_host(mem_size: int) -> None:
    """Refuse guest RAM larger than the host's before mapping any of it: a guest that
    touches more than the host has gets pykvm (or something else) OOM-killed later."""
    host = host_ram_size()
    if host and mem_size > host:
        raise HostResourceError(f"guest RAM of {_format(mem_size)} is more than this host has "
                                f"({_format(host)}): ask for less with --mem")


def _format(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.{0 if size % (1 << shift) == 0 else 1}f} {unit}"
    return f"{size} bytes"


def _mmap(what: str, size: int, *args, **kwargs) -> mmap.mmap:
    """mmap, with the host refusing memory (ENOMEM) as a typed error naming the size."""
    try:
        return mmap.mmap(*args, **kwargs)
    except OSError as error:
        if error.errno != errno.ENOMEM:
            raise
        raise HostResourceError(f"cannot map {_format(size)} of {what}: the host is out of "
                                f"memory for it (ENOMEM); ask for less with --mem") from None


MFD_CLOEXEC, MFD_ALLOW_SEALING = 0x0001, 0x0002
F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW = 0x0001, 0x0002, 0x0004


def _shareable_fd(size: int) -> int:
    """A memfd of ``size`` bytes, sealed: its size can never change again."""
    fd = os.memfd_create("pykvm-guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.ENOMEM, errno.ENOSPC):
            raise HostResourceError(f"cannot make {_format(size)} of guest RAM: the host is "
                                    f"out of memory for it; ask for less with --mem") from None
        raise
    return fd


def _map_shared(fd: int, size: int, offset: int) -> mmap.mmap:
    mapping = _mmap("guest RAM", size, fd, size, flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
    # Guest RAM is the guest's business: keep it out of core dumps of pykvm.
    if hasattr(mmap, "MADV_DONTDUMP"):
        mapping.madvise(mmap.MADV_DONTDUMP)
    return mapping


class GuestMemory:
    """All of a VM's RAM, as a list of non-overlapping regions."""

    def __init__(self, regions: list[MemoryRegion], fd: int = -1):
        self.regions = sorted(regions, key=lambda r: r.guest_addr)
        self._last = self.regions[0]
        self.fd = fd      # the memfd every region maps (-1: not shareable); owned here

    @property
    def shareable(self) -> bool:
        """True when a back end can map this RAM (the regions' ``file_offset`` in ``fd``)."""
        return self.fd >= 0

    @classmethod
    def anonymous(cls, mem_size: int) -> "GuestMemory":
        """RAM of ``mem_size`` bytes laid out by :func:`layout.ram_ranges`: one sealed
        memfd, each region mapped MAP_SHARED at its own offset (see the module doc)."""
        if mem_size <= 0 or mem_size % PAGE_SIZE:
            raise GuestMemoryError(f"memory size {mem_size} is not a positive multiple of 4 KiB")
        check_fits_host(mem_size)
        fd = _shareable_fd(mem_size)
        regions: list[MemoryRegion] = []
        try:
            offset = 0
            for start, size in ram_ranges(mem_size):
                regions.append(MemoryRegion(start, size, _map_shared(fd, size, offset), offset))
                offset += size
        except BaseException:
            for region in regions:
                region.close()
            os.close(fd)
            raise
        return cls(regions, fd)

    @classmethod
    def from_file(cls, path: str, layout: list[tuple[int, int, int]]) -> "GuestMemory":
        """RAM mapped copy-on-write from a file (a snapshot's memory.bin): ``layout``
        lists (guest_addr, size, file_offset) per region. Guest writes stay private to
        this mapping; the file is never changed, so one file serves many VMs."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        regions: list[MemoryRegion] = []
        try:
            for guest_addr, size, file_offset in layout:
                if size <= 0 or size % PAGE_SIZE or file_offset % PAGE_SIZE:
                    raise GuestMemoryError(f"{path}: region {guest_addr:#x}+{size:#x} at file "
                                           f"offset {file_offset:#x} is not page-aligned")
                mapping = _mmap(f"guest RAM from {path}", size, fd, size,
                                flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=file_offset)
                if hasattr(mmap, "MADV_DONTDUMP"):
                    mapping.madvise(mmap.MADV_DONTDUMP)
                regions.append(MemoryRegion(guest_addr, size, mapping))
        except BaseException:
            for region in regions:
                region.close()
            raise
        finally:
            os.close(fd)   # the mappings keep the file
        return cls(regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    # --- lookup -----------------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The region holding [gpa, gpa+length), or GuestMemoryError."""
        last = self._last
        if last.guest_addr <= gpa and gpa + length <= last.end and length >= 0:
            return last
        if length >= 0:
            for region in self.regions:
                if region.contains(gpa, length):
                    self._last = region
                    return region
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_of(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of [gpa, gpa+length); the range must lie in one region."""
        region = self.region_of(gpa, length)
        offset = gpa - region.guest_addr
        return region.view[offset:offset + length]

    def host_address(self, gpa: int, length: int) -> int:
        """pykvm's own virtual address of [gpa, gpa+length) (one region): what a
        vhost-user back end is told ring addresses are (SET_VRING_ADDR)."""
        region = self.region_of(gpa, length)
        return region.host_addr + gpa - region.guest_addr

    # --- copies -------------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        view = self.view(gpa, length)
        view[:] = bytes([byte]) * length

    def discard(self, gpa: int, length: int) -> None:
        """Give the host back the page-aligned [gpa, gpa+length) (a virtio-balloon
        inflate, pykvm/devices/virtio/balloon.py); the guest's next touch maps a page
        again. The shared memfd's pages are punched out (MADV_REMOVE: freed for every
        process that maps the file, zero when touched again); a snapshot-restored
        region's private copies are dropped (MADV_DONTNEED: the page reads as the
        file's again). The range may span regions; GuestMemoryError if any of it is
        not RAM or not page-aligned."""
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not page-aligned")
        end = gpa + length
        while gpa < end:
            region = self.region_of(gpa, PAGE_SIZE)
            count = min(end, region.end) - gpa
            self.region_of(gpa, count)
            advice = mmap.MADV_REMOVE if self.shareable else mmap.MADV_DONTNEED
            region.mapping.madvise(advice, gpa - region.guest_addr, count)
            gpa += count

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.view(gpa, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read_u8(self, gpa: int) -> int:
        return self.read_int(gpa, 1)

    def read_u16(self, gpa: int) -> int:
        return self.read_int(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self.read_int(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_int(gpa, 8)

    def write_u8(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 1, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 2, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 4, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.write_int(gpa, 8, value)

    def unpack(self, fmt: str, gpa: int) -> tuple:
        return struct.unpack_from(fmt, self.view(gpa, struct.calcsize(fmt)))

    def pack(self, fmt: str, gpa: int, *values) -> None:
        struct.pack_into(fmt, self.view(gpa, struct.calcsize(fmt)), 0, *values)

    def close(self) -> None:
        for region in self.regions:
            region.close()
        if self.fd >= 0:
            os.close(self.fd)   # the pages go with the last mapping (or a back end's)
            self.fd = -1

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
