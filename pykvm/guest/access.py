"""A data access by guest-linear address, checked the way the vCPU would check it.

When pykvm completes an instruction for the guest (pykvm/quirks/complete.py) its
memory operand must behave as if the CPU had accessed it: translated through
the guest's page tables and, where the page is missing or forbids the access,
a #PF with CR2 and the error code of SDM vol. 3A 4.7 ("Page-Fault
Exceptions") instead of a read or write. This module answers "where do these
bytes live, or which #PF would the CPU raise" for one access of a few bytes,
possibly across a page boundary (both pages are checked before anything is
written, so a faulting write changes nothing).

Not modelled: accessed/dirty bits (pykvm does not set them; a kernel's own
stack and data pages, the operands seen so far, are dirty already), protection
keys, and reserved-bit checks (pagewalk.py does not report them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .pagewalk import CR0_PG, PAGE_4K, address_mask, walk

# Page-fault error code bits (SDM vol. 3A 4.7).
PF_PRESENT = 1 << 0      # the page was present: a protection violation
PF_WRITE = 1 << 1
PF_USER = 1 << 2

CR0_WP = 1 << 16
CR4_SMAP = 1 << 21
RFLAGS_AC = 1 << 18


@dataclass(frozen=True)
class PageFault:
    """The #PF the CPU would raise: CR2 = address."""

    address: int
    error_code: int


@dataclass(frozen=True)
class Access:
    """Where an access's bytes are in guest-physical memory, in order."""

    pieces: tuple[tuple[int, int], ...]    # (guest-physical address, length)

    def read(self, memory) -> bytes:
        return b"".join(memory.read(physical, length) for physical, length in self.pieces)

    def write(self, memory, data: bytes) -> None:
        offset = 0
        for physical, length in self.pieces:
            memory.write(physical, data[offset:offset + length])
            offset += length


def locate(memory, sregs, linear: int, length: int, *, write: bool, cpl: int = 0,
           rflags: int = 0) -> Access | PageFault:
    """The pages of a ``length``-byte data access at ``linear`` by code at ``cpl``.

    Supervisor accesses (CPL < 3) may write read-only pages unless CR0.WP is set and may
    touch user pages unless SMAP is on (CR4.SMAP) with RFLAGS.AC clear (SDM vol. 3A 4.6)."""
    wrap = address_mask(sregs)
    user = cpl == 3
    pieces = []
    done = 0
    while done < length:
        address = (linear + done) & wrap
        chunk = min(length - done, PAGE_4K - (address & (PAGE_4K - 1)))
        translation = walk(memory, sregs, address)
        error = (PF_WRITE if write else 0) | (PF_USER if user else 0)
        if translation is None:
            return PageFault(address, error)
        if _forbidden(translation, sregs, write=write, user=user, rflags=rflags):
            return PageFault(address, error | PF_PRESENT)
        pieces.append((translation.physical, chunk))
        done += chunk
    return Access(tuple(pieces))


def _forbidden(translation, sregs, *, write: bool, user: bool, rflags: int) -> bool:
    if not sregs.cr0 & CR0_PG:
        return False
    if user:
        return not translation.user or (write and not translation.writable)
    if write and not translation.writable and sregs.cr0 & CR0_WP:
        return True
    smap = sregs.cr4 & CR4_SMAP and not rflags & RFLAGS_AC
    return bool(translation.user and smap)
