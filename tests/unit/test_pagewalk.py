"""The guest page-table walker and IDT reader against tables built by hand in a
GuestMemory: every paging mode, large pages, permissions, and hostile tables.
No KVM needed."""

import struct

import pytest

from pykvm.boot.modes import gdt_entry
from pykvm.guest.idt import INTERRUPT_GATE, TRAP_GATE, read_gate
from pykvm.guest.pagewalk import (CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, EFER_NXE,
                                  NO_EXECUTE, PAGE_SIZE_BIT, PRESENT, USER, WRITABLE,
                                  read_linear, translate, walk)
from pykvm.ioctl.structs import kvm_sregs
from pykvm.memory import GuestMemory

MiB = 1 << 20
RAM = 8 * MiB
P, W, U, PS = PRESENT, WRITABLE, USER, PAGE_SIZE_BIT
CR0_PE = 1


@pytest.fixture
def memory():
    with GuestMemory.anonymous(RAM) as mem:
        yield mem


class Tables:
    """Page tables allocated page by page from a bump pointer in guest RAM."""

    def __init__(self, memory, entry_size=8, start=0x100000):
        self.memory = memory
        self.entry_size = entry_size
        self.next = start

    def new(self) -> int:
        table = self.next
        self.next += 0x1000
        self.memory.fill(table, 0x1000)
        return table

    def set(self, table: int, index: int, value: int) -> None:
        self.memory.write_int(table + index * self.entry_size, self.entry_size, value)


def sregs_for(cr0=0, cr3=0, cr4=0, efer=0):
    sregs = kvm_sregs()
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = cr0 | CR0_PE, cr3, cr4, efer
    return sregs


# --- no paging -------------------------------------------------------------------------
def test_no_paging_is_identity_within_32_bits(memory):
    sregs = sregs_for()
    assert translate(memory, sregs, 0x12345) == 0x12345
    assert translate(memory, sregs, 0x1_0000_1000) == 0x1000
    t = walk(memory, sregs, 0x5000)
    assert t.user and t.writable and t.executable


# --- 32-bit paging ---------------------------------------------------------------------
def test_32bit_4k_pages_and_permissions(memory):
    tables = Tables(memory, entry_size=4)
    pd, pt = tables.new(), tables.new()
    tables.set(pd, 0x300, pt | P | W | U)              # linear 0xC0000000..0xC03FFFFF
    tables.set(pt, 5, 0x234000 | P | U)                # read-only user page
    tables.set(pt, 6, 0x235000 | P | W)                # writable supervisor page
    sregs = sregs_for(CR0_PG, pd)
    t = walk(memory, sregs, 0xC0005ABC)
    assert (t.physical, t.page_size, t.user, t.writable, t.executable) == \
        (0x234ABC, 0x1000, True, False, True)
    t = walk(memory, sregs, 0xC0006000)
    assert (t.physical, t.user, t.writable) == (0x235000, False, True)
    assert translate(memory, sregs, 0xC0007000) is None        # PTE not present
    assert translate(memory, sregs, 0x00400000) is None        # PDE not present
    # Linear addresses are 32 bits wide here: high bits are dropped.
    assert translate(memory, sregs, 0x1_C0005ABC) == 0x234ABC


def test_32bit_4m_pages_need_cr4_pse(memory):
    tables = Tables(memory, entry_size=4)
    pd = tables.new()
    tables.set(pd, 1, 0x400000 | P | W | PS)
    with_pse = sregs_for(CR0_PG, pd, CR4_PSE)
    t = walk(memory, with_pse, 0x4ABCDE)
    assert (t.physical, t.page_size) == (0x4ABCDE, 4 * MiB)
    # Without CR4.PSE the PS bit is ignored and the entry names a page table
    # (here 0x400000, which holds zeros: nothing mapped).
    assert translate(memory, sregs_for(CR0_PG, pd), 0x4ABCDE) is None


def test_32bit_pse36_high_physical_bits(memory):
    tables = Tables(memory, entry_size=4)
    pd = tables.new()
    tables.set(pd, 2, 0x800000 | (0x3 << 13) | P | PS)   # physical bits 39:32 = 3
    assert translate(memory, sregs_for(CR0_PG, pd, CR4_PSE), 0x812345) == 0x3_0081_2345


# --- PAE --------------------------------------------------------------------------------
def test_pae_2m_and_4k_pages_with_nx(memory):
    tables = Tables(memory)
    pdpt = 0x100FE0                       # 32-byte aligned, not page aligned: allowed in PAE
    pd, pt = 0x101000, 0x102000
    tables.next = 0x101000
    tables.new(), tables.new()
    tables.set(pdpt, 3, pd | P)                             # linear 0xC0000000..
    tables.set(pd, 0, 0x600000 | P | W | PS | (1 << 12))   # bit 12 = PAT of a 2 MiB page
    tables.set(pd, 1, pt | P | W | U)
    tables.set(pt, 2, 0x345000 | P | U | NO_EXECUTE)
    sregs = sregs_for(CR0_PG, pdpt, CR4_PAE, EFER_NXE)
    t = walk(memory, sregs, 0xC0012345)
    assert (t.physical, t.page_size, t.user, t.writable) == (0x612345, 2 * MiB, False, True)
    t = walk(memory, sregs, 0xC0202FFF)
    assert (t.physical, t.user, t.writable, t.executable) == (0x345FFF, True, False, False)
    # NX means nothing while EFER.NXE is clear.
    assert walk(memory, sregs_for(CR0_PG, pdpt, CR4_PAE), 0xC0202000).executable
    assert translate(memory, sregs, 0x00000000) is None      # PDPTE 0 not present


# --- 4-level and 5-level ------------------------------------------------------------------
def long_mode(cr3, nx=True, la57=False):
    return sregs_for(CR0_PG, cr3, CR4_PAE | (CR4_LA57 if la57 else 0),
                     EFER_LMA | (EFER_NXE if nx else 0))


def test_4level_4k_2m_1g_pages(memory):
    tables = Tables(memory)
    pml4, pdpt, pd, pt = (tables.new() for _ in range(4))
    kernel = 0xFFFFFFFF80000000                      # PML4 511, PDPT 510
    tables.set(pml4, 511, pdpt | P | W)
    tables.set(pdpt, 510, pd | P | W)
    tables.set(pd, 0, 0x200000 | P | W | PS)
    tables.set(pd, 1, pt | P | W)
    tables.set(pt, 3, 0x7000 | P | NO_EXECUTE)
    tables.set(pdpt, 0, 0x40000000 | P | W | U | PS)   # a 1 GiB page
    sregs = long_mode(pml4)
    t = walk(memory, sregs, kernel + 0x1234)
    assert (t.physical, t.page_size, t.user) == (0x201234, 2 * MiB, False)
    t = walk(memory, sregs, kernel + 0x203456)
    assert (t.physical, t.page_size, t.writable, t.executable) == (0x7456, 0x1000, False, False)
    t = walk(memory, sregs, 0xFFFFFF8000000000 + 0x123456)
    assert (t.physical, t.page_size, t.user) == (0x40123456, 1 << 30, False)  # PML4 entry: no U
    assert translate(memory, sregs, kernel + 0x204000) is None


def test_4level_rejects_non_canonical_addresses(memory):
    tables = Tables(memory)
    pml4, pdpt = tables.new(), tables.new()
    tables.set(pml4, 0, pdpt | P)
    tables.set(pdpt, 0, P | PS)
    sregs = long_mode(pml4)
    assert translate(memory, sregs, 0x1000) == 0x1000
    assert translate(memory, sregs, 0x0000800000001000) is None
    assert translate(memory, sregs, 0xFFFF000000001000) is None


def test_5level(memory):
    tables = Tables(memory)
    pml5, pml4, pdpt = tables.new(), tables.new(), tables.new()
    tables.set(pml5, 1, pml4 | P | W)
    tables.set(pml4, 0, pdpt | P | W)
    tables.set(pdpt, 0, 0x80000000 | P | W | PS)
    assert translate(memory, long_mode(pml5, la57=True), (1 << 48) + 0x42) == 0x80000042


# --- hostile tables ---------------------------------------------------------------------------
def test_tables_outside_ram_give_none(memory):
    tables = Tables(memory)
    pml4 = tables.new()
    tables.set(pml4, 0, 0x7FFF_FFFF_F000 | P)        # the PDPT would lie far beyond RAM
    tables.set(pml4, 1, (RAM - 0x1000) | P)           # a PDPT at RAM's last page ...
    memory.write_u64(RAM - 0x1000, 0xFFFF_F000 | P)   # ... whose PD is in the PCI hole
    assert translate(memory, long_mode(pml4), 0x1000) is None
    assert translate(memory, long_mode(pml4), 0x8000000000) is None
    assert translate(memory, long_mode(1 << 40), 0x1000) is None   # CR3 itself outside RAM
    assert translate(memory, sregs_for(CR0_PG, 0xFFFFF000, CR4_PAE), 0x1000) is None
    assert read_linear(memory, long_mode(pml4), 0x1000, 4) is None


def test_walk_ignores_garbage_in_unused_bits(memory):
    tables = Tables(memory)
    pml4 = tables.new()
    memory.fill(pml4, 0x1000, 0xFF)   # every entry present, every bit set
    # Reserved bits are not checked; the walk must simply end, in RAM or not.
    assert translate(memory, long_mode(pml4), 0x1000) is None


# --- reading across pages -----------------------------------------------------------------------
def test_read_linear_follows_each_page(memory):
    tables = Tables(memory)
    pml4, pdpt, pd, pt = (tables.new() for _ in range(4))
    tables.set(pml4, 0, pdpt | P)
    tables.set(pdpt, 0, pd | P)
    tables.set(pd, 0, pt | P)
    tables.set(pt, 1, 0x300000 | P)      # linear 0x1000 -> 0x300000
    tables.set(pt, 2, 0x280000 | P)      # linear 0x2000 -> 0x280000 (not contiguous)
    memory.write(0x300FFC, b"abcd")
    memory.write(0x280000, b"efgh")
    sregs = long_mode(pml4)
    assert read_linear(memory, sregs, 0x1FFC, 8) == b"abcdefgh"
    assert read_linear(memory, sregs, 0x2FFC, 8) is None   # runs into an unmapped page


# --- IDT ----------------------------------------------------------------------------------------------
def gate64(handler, selector=0x10, gate_type=INTERRUPT_GATE, dpl=0, ist=0, present=True):
    attributes = gate_type | (dpl << 5) | (0x80 if present else 0)
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, attributes,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)


def gate32(offset, selector, gate_type=INTERRUPT_GATE, dpl=0):
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, gate_type | (dpl << 5) | 0x80,
                       offset >> 16)


def test_idt_64bit_gate(memory):
    tables = Tables(memory)
    pml4, pdpt = tables.new(), tables.new()
    tables.set(pml4, 511, pdpt | P)
    tables.set(pdpt, 511, 0x0 | P | PS)               # 0xFFFFFFFFC0000000 -> physical 0
    sregs = long_mode(pml4)
    sregs.idt.base, sregs.idt.limit = 0xFFFFFFFFC0050000, 256 * 16 - 1
    memory.write(0x50000 + 14 * 16, gate64(0xFFFFFFFF81A00B30, ist=2))
    memory.write(0x50000 + 3 * 16, gate64(0xFFFFFFFF81000000, gate_type=TRAP_GATE, dpl=3))
    gate = read_gate(memory, sregs, 14)
    assert (gate.handler, gate.selector, gate.type, gate.dpl, gate.present, gate.ist) == \
        (0xFFFFFFFF81A00B30, 0x10, INTERRUPT_GATE, 0, True, 2)
    gate = read_gate(memory, sregs, 3)
    assert (gate.type, gate.dpl) == (TRAP_GATE, 3)
    assert not read_gate(memory, sregs, 4).present
    sregs.idt.limit = 14 * 16 + 14                     # gate 14 not wholly inside the limit
    assert read_gate(memory, sregs, 14) is None
    assert read_gate(memory, sregs, 300) is None
    sregs.idt.base, sregs.idt.limit = 0x1000, 0xFFF    # an IDT nobody mapped
    assert read_gate(memory, sregs, 14) is None


def test_idt_32bit_gate_adds_the_code_segment_base(memory):
    sregs = sregs_for()                                 # protected mode, no paging
    sregs.gdt.base, sregs.gdt.limit = 0x1000, 0x1F
    memory.write_u64(0x1008, gdt_entry(0x100000, 0xFFFFF, 0x9B, 0xC))
    sregs.idt.base, sregs.idt.limit = 0x2000, 0x7FF
    memory.write(0x2000 + 14 * 8, gate32(0x1234, 0x08, TRAP_GATE, dpl=0))
    memory.write(0x2000 + 15 * 8, gate32(0x1234, 0x28))      # selector beyond the GDT limit
    memory.write(0x2000 + 16 * 8, gate32(0x1234, 0x0C))      # an LDT selector
    gate = read_gate(memory, sregs, 14)
    assert (gate.handler, gate.selector, gate.type, gate.present) == (0x101234, 0x08, TRAP_GATE, True)
    assert read_gate(memory, sregs, 15) is None
    assert read_gate(memory, sregs, 16) is None


def test_real_mode_interrupt_vector_table(memory):
    sregs = kvm_sregs()                                 # CR0.PE clear
    sregs.idt.base, sregs.idt.limit = 0, 0x3FF
    memory.write(0x10 * 4, struct.pack("<HH", 0x0065, 0xF000))
    gate = read_gate(memory, sregs, 0x10)
    assert (gate.handler, gate.selector) == (0xF0065, 0xF000)
