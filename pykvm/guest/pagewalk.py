"""A walk of the guest's own page tables: guest-linear -> guest-physical.

pykvm reads guest state (the instruction at RIP, an exception frame on the
stack, an IDT gate) by linear address, so it must translate the way the vCPU
does, in whichever paging mode the guest's control registers select:

  CR0.PG = 0            no paging: linear = physical (32 bits)
  CR4.PAE = 0           32-bit paging: 2 levels of 4-byte entries, 4 MiB pages with CR4.PSE
  EFER.LMA = 0          PAE: a 4-entry PDPT, then 2 levels of 8-byte entries, 2 MiB pages
  EFER.LMA = 1          4-level (5-level with CR4.LA57): 2 MiB and 1 GiB pages

The tables are guest memory, so they are untrusted: every entry is read
bounds-checked through GuestMemory, and a table outside guest RAM, a missing
entry or a non-canonical address gives None, never an exception. Reserved bits
are not checked (a CPU would raise #PF with RSVD set; pykvm only reads).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GuestMemoryError

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

PRESENT = 1 << 0
WRITABLE = 1 << 1
USER = 1 << 2
PAGE_SIZE_BIT = 1 << 7
NO_EXECUTE = 1 << 63

ADDRESS_MASK = 0x000FFFFFFFFFF000   # bits 51:12 of a 64-bit-format entry
ADDRESS_MASK_32 = 0xFFFFF000
PAE_PDPT_MASK = 0xFFFFFFE0          # CR3 in PAE mode: a 32-byte-aligned PDPT
PSE36_SHIFT = 13                    # a 4 MiB PDE's bits 20:13 are physical bits 39:32

PAGE_4K = 1 << 12
LOW_32 = 0xFFFFFFFF

NONE, BITS32, PAE, LEVEL4, LEVEL5 = "none", "32-bit", "pae", "4-level", "5-level"


@dataclass(frozen=True)
class Translation:
    """Where a linear address lands, and what the page allows (all levels combined)."""

    physical: int
    page_size: int
    user: bool
    writable: bool
    executable: bool


@dataclass(frozen=True)
class _Level:
    shift: int          # the lowest linear-address bit this level's index covers
    index_bits: int
    maps_pages: bool    # an entry with PS set maps a page of 1 << shift bytes here


# The table levels of each mode, top first (PAE's PDPT is read apart: it has no permissions).
_LEVELS = {
    BITS32: (_Level(22, 10, True), _Level(12, 10, False)),
    PAE: (_Level(21, 9, True), _Level(12, 9, False)),
    LEVEL4: (_Level(39, 9, False), _Level(30, 9, True), _Level(21, 9, True), _Level(12, 9, False)),
    LEVEL5: (_Level(48, 9, False), _Level(39, 9, False), _Level(30, 9, True), _Level(21, 9, True),
             _Level(12, 9, False)),
}


def paging_mode(sregs) -> str:
    if not sregs.cr0 & CR0_PG:
        return NONE
    if sregs.efer & EFER_LMA:
        return LEVEL5 if sregs.cr4 & CR4_LA57 else LEVEL4
    return PAE if sregs.cr4 & CR4_PAE else BITS32


def address_mask(sregs) -> int:
    """Linear addresses wrap at 4 GiB outside long mode."""
    return (1 << 64) - 1 if sregs.efer & EFER_LMA and sregs.cr0 & CR0_PG else LOW_32


def is_canonical(linear: int, bits: int) -> bool:
    top = linear >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def walk(memory, sregs, linear: int) -> Translation | None:
    """The translation of ``linear`` under ``sregs`` (a kvm_sregs), or None if unmapped."""
    mode = paging_mode(sregs)
    if mode == NONE:
        return Translation(linear & LOW_32, PAGE_4K, True, True, True)
    try:
        return _walk_tables(memory, sregs, mode, linear)
    except GuestMemoryError:
        return None  # a table (or the PDPT) outside guest RAM


def _walk_tables(memory, sregs, mode: str, linear: int) -> Translation | None:
    nx_enabled = mode != BITS32 and bool(sregs.efer & EFER_NXE)
    if mode in (LEVEL4, LEVEL5):
        if not is_canonical(linear, 57 if mode == LEVEL5 else 48):
            return None
        entry_size, mask, table = 8, ADDRESS_MASK, sregs.cr3 & ADDRESS_MASK
    elif mode == PAE:
        linear &= LOW_32
        pdpte = memory.read_u64((sregs.cr3 & PAE_PDPT_MASK) + (linear >> 30) * 8)
        if not pdpte & PRESENT:
            return None
        entry_size, mask, table = 8, ADDRESS_MASK, pdpte & ADDRESS_MASK
    else:
        linear &= LOW_32
        entry_size, mask, table = 4, ADDRESS_MASK_32, sregs.cr3 & ADDRESS_MASK_32

    user = writable = True
    no_execute = False
    for level in _LEVELS[mode]:
        index = (linear >> level.shift) & ((1 << level.index_bits) - 1)
        entry = memory.read_int(table + index * entry_size, entry_size)
        if not entry & PRESENT:
            return None
        user &= bool(entry & USER)
        writable &= bool(entry & WRITABLE)
        no_execute |= nx_enabled and bool(entry & NO_EXECUTE)
        large = level.maps_pages and entry & PAGE_SIZE_BIT \
            and (mode != BITS32 or sregs.cr4 & CR4_PSE)
        if large or level.shift == 12:
            page_size = 1 << level.shift
            base = entry & mask & ~(page_size - 1)   # also drops the PAT bit of a large page
            if large and mode == BITS32:
                base |= ((entry >> PSE36_SHIFT) & 0xFF) << 32
            return Translation(base | (linear & (page_size - 1)), page_size,
                               user, writable, not no_execute)
        table = entry & mask
    return None  # not reached: the last level always maps a page


def translate(memory, sregs, linear: int) -> int | None:
    """Guest-physical address of ``linear``, or None when it is not mapped."""
    translation = walk(memory, sregs, linear)
    return None if translation is None else translation.physical


def read_linear(memory, sregs, linear: int, length: int) -> bytes | None:
    """``length`` bytes at a guest-linear address, page by page; None if any byte is unmapped
    or outside guest RAM."""
    wrap = address_mask(sregs)
    out = bytearray()
    while len(out) < length:
        address = (linear + len(out)) & wrap
        chunk = min(length - len(out), PAGE_4K - (address & (PAGE_4K - 1)))
        physical = translate(memory, sregs, address)
        if physical is None:
            return None
        try:
            out += memory.read(physical, chunk)
        except GuestMemoryError:
            return None
    return bytes(out)
