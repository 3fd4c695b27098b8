"""A walk of the guest's own page tables (placeholder until the full walker lands):
4-level long-mode paging with 4 KiB, 2 MiB and 1 GiB pages."""

from __future__ import annotations

from ..errors import GuestMemoryError

PRESENT = 1
PAGE_SIZE_BIT = 1 << 7
ADDRESS_MASK = 0x000FFFFFFFFFF000


def translate(memory, sregs, linear: int) -> int | None:
    table = sregs.cr3 & ADDRESS_MASK
    try:
        for level, shift in enumerate((39, 30, 21, 12)):
            entry = memory.read_u64(table + ((linear >> shift) & 0x1FF) * 8)
            if not entry & PRESENT:
                return None
            if shift in (30, 21) and entry & PAGE_SIZE_BIT:
                page_mask = (1 << shift) - 1
                return (entry & ADDRESS_MASK & ~page_mask) | (linear & page_mask)
            table = entry & ADDRESS_MASK
        return table | (linear & 0xFFF)
    except GuestMemoryError:
        return None
