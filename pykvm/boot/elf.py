"""Load an ELF64 x86-64 executable (a Linux vmlinux) into guest RAM.

Each PT_LOAD segment goes to its *physical* address (p_paddr): a vmlinux links
its code at virtual 0xffffffff81000000 but expects to sit at physical 16 MiB,
and it turns its own paging on from there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ImageError
from ..layout import HIGH_RAM_START, MiB
from ..memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1

# Elf64_Ehdr from e_type on (after the 16-byte e_ident), and Elf64_Phdr.
EHDR = struct.Struct("<HHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
EHDR_SIZE = 16 + EHDR.size


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD program header."""

    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int

    @property
    def paddr_end(self) -> int:
        return self.paddr + self.memsz

    def holds_virtual(self, address: int) -> bool:
        return self.vaddr <= address < self.vaddr + self.memsz

    def holds_physical(self, address: int) -> bool:
        return self.paddr <= address < self.paddr_end


@dataclass(frozen=True)
class LoadedElf:
    entry: int   # physical address of the entry point
    start: int   # lowest physical address written
    end: int     # one past the highest physical address written (the kernel's end)


def is_elf(data: bytes | memoryview) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


def parse_segments(data: bytes | memoryview, name: str = "vmlinux") -> tuple[int, list[Segment]]:
    """Validate an ELF64 x86-64 executable; its entry address (as linked) and PT_LOAD segments."""
    if not is_elf(data):
        raise ImageError(f"{name}: not an ELF file (no \\x7fELF magic)")
    if len(data) < EHDR_SIZE:
        raise ImageError(f"{name}: truncated ELF header ({len(data)} bytes)")
    if data[4] != ELFCLASS64:
        raise ImageError(f"{name}: not a 64-bit ELF (class {data[4]})")
    if data[5] != ELFDATA2LSB:
        raise ImageError(f"{name}: not a little-endian ELF")
    (e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = EHDR.unpack_from(data, 16)
    if e_machine != EM_X86_64:
        raise ImageError(f"{name}: ELF is not for x86-64 (e_machine {e_machine})")
    if e_type != ET_EXEC:
        raise ImageError(f"{name}: ELF is not an executable (e_type {e_type}, want ET_EXEC)")
    if e_phnum and e_phentsize != PHDR.size:
        raise ImageError(f"{name}: ELF program headers are {e_phentsize} bytes, not {PHDR.size}")
    if e_phoff + e_phnum * PHDR.size > len(data):
        raise ImageError(f"{name}: truncated ELF (program headers run past the end of the file)")
    segments = []
    for index in range(e_phnum):
        p_type, _flags, offset, vaddr, paddr, filesz, memsz, _align = \
            PHDR.unpack_from(data, e_phoff + index * PHDR.size)
        if p_type != PT_LOAD:
            continue
        if filesz > memsz:
            raise ImageError(f"{name}: ELF segment {index} has more file bytes than memory bytes")
        if offset + filesz > len(data):
            raise ImageError(f"{name}: truncated ELF (segment {index} runs past the end of the file)")
        segments.append(Segment(offset, vaddr, paddr, filesz, memsz))
    if not segments:
        raise ImageError(f"{name}: ELF has no loadable (PT_LOAD) segment")
    return e_entry, segments


def physical_entry(entry: int, segments: list[Segment], name: str = "vmlinux") -> int:
    """The physical address of ``entry``.

    Normally the entry is a virtual address inside a segment and is translated
    with that segment's vaddr->paddr offset. Linux's vmlinux links
    ``ENTRY(phys_startup_64)``, already physical: it lies in no segment
    virtually, but in one physically, and is used as it is.
    """
    for segment in segments:
        if segment.holds_virtual(entry):
            return entry - segment.vaddr + segment.paddr
    for segment in segments:
        if segment.holds_physical(entry):
            return entry
    raise ImageError(f"{name}: ELF entry point {entry:#x} lies outside every loadable segment")


def load_elf(memory: GuestMemory, data: bytes | memoryview, name: str = "vmlinux") -> LoadedElf:
    """Copy every PT_LOAD segment to its physical address; zero its tail (bss)."""
    linked_entry, segments = parse_segments(data, name)
    entry = physical_entry(linked_entry, segments, name)
    source = memoryview(data)
    for segment in segments:
        if segment.paddr < HIGH_RAM_START:
            # Below 1 MiB live the zero page, command line, page tables and firmware tables.
            raise ImageError(f"{name}: ELF segment at {segment.paddr:#x} would overwrite the boot area"
                             f" below {HIGH_RAM_START:#x}")
        if not memory.contains(segment.paddr, segment.memsz):
            raise ImageError(f"{name}: kernel does not fit in {memory.size // MiB} MiB of guest RAM"
                             f" (segment {segment.paddr:#x}-{segment.paddr_end:#x})")
    for segment in segments:
        memory.write(segment.paddr, source[segment.offset:segment.offset + segment.filesz])
        memory.fill(segment.paddr + segment.filesz, segment.memsz - segment.filesz)
    return LoadedElf(entry=entry,
                     start=min(segment.paddr for segment in segments),
                     end=max(segment.paddr_end for segment in segments))
