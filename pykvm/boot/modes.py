"""The CPU state a guest starts in: real, 32-bit protected, or 64-bit long mode.

Without firmware, pykvm does what a boot loader would: write a GDT (and for
long mode identity page tables) into guest memory and load the segment and
control registers the mode needs. The GDT layout follows the Linux boot
protocol's expectations for 64-bit entry: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
"""

from __future__ import annotations

from .. import layout
from ..errors import ConfigError

MODES = ("real", "protected", "long")

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7

# Selectors in the boot GDT.
CODE32_SELECTOR = 0x08
CODE64_SELECTOR = 0x10
DATA_SELECTOR = 0x18
TSS_SELECTOR = 0x20


def gdt_entry(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte segment descriptor: flags are the G/DB/L/AVL nibble."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | (((base >> 24) & 0xFF) << 56))


BOOT_GDT = (
    0,                                      # null
    gdt_entry(0, 0xFFFFF, 0x9B, 0xC),       # 0x08: 32-bit code, flat (G, DB)
    gdt_entry(0, 0xFFFFF, 0x9B, 0xA),       # 0x10: 64-bit code (G, L)
    gdt_entry(0, 0xFFFFF, 0x93, 0xC),       # 0x18: data, flat
    gdt_entry(0, 0x67, 0x8B, 0x0),          # 0x20: busy TSS (VMX wants a usable TR)
    0,                                      # upper half of the 64-bit TSS descriptor
)


def segment_from_descriptor(segment, selector: int, descriptor: int) -> None:
    """Fill a kvm_segment from a descriptor, as the CPU would on a segment load."""
    access = (descriptor >> 40) & 0xFF
    flags = (descriptor >> 52) & 0xF
    limit = (descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16)
    segment.base = ((descriptor >> 16) & 0xFFFFFF) | (((descriptor >> 56) & 0xFF) << 24)
    segment.limit = (limit << 12) | 0xFFF if flags & 0x8 else limit
    segment.selector = selector
    segment.type = access & 0xF
    segment.s = (access >> 4) & 1
    segment.dpl = (access >> 5) & 3
    segment.present = (access >> 7) & 1
    segment.avl = flags & 1
    segment.l = (flags >> 1) & 1
    segment.db = (flags >> 2) & 1
    segment.g = (flags >> 3) & 1
    segment.unusable = 0


def write_boot_gdt(memory) -> None:
    for index, descriptor in enumerate(BOOT_GDT):
        memory.write_u64(layout.GDT_ADDR + 8 * index, descriptor)
    memory.fill(layout.IDT_ADDR, 8)  # an empty IDT: limit 0 below


def write_identity_page_tables(memory) -> None:
    """Map the first 4 GiB 1:1 with 2 MiB pages (PML4 -> 1 PDPT -> 4 PDs)."""
    memory.fill(layout.PML4_ADDR, 0x1000)
    memory.fill(layout.PDPT_ADDR, 0x1000)
    memory.write_u64(layout.PML4_ADDR, layout.PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE)
    for directory in range(layout.PD_COUNT):
        pd = layout.PD_ADDR + directory * 0x1000
        memory.write_u64(layout.PDPT_ADDR + 8 * directory, pd | PTE_PRESENT | PTE_WRITABLE)
        entries = b"".join(
            (((directory << 30) | (i << 21)) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE).to_bytes(8, "little")
            for i in range(512))
        memory.write(pd, entries)


def _load_flat_segments(sregs, code_selector: int) -> None:
    segment_from_descriptor(sregs.cs, code_selector, BOOT_GDT[code_selector >> 3])
    for name in ("ds", "es", "fs", "gs", "ss"):
        segment_from_descriptor(getattr(sregs, name), DATA_SELECTOR, BOOT_GDT[DATA_SELECTOR >> 3])
    segment_from_descriptor(sregs.tr, TSS_SELECTOR, BOOT_GDT[TSS_SELECTOR >> 3])
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, 8 * len(BOOT_GDT) - 1
    sregs.idt.base, sregs.idt.limit = layout.IDT_ADDR, 0


def set_mode(vcpu, memory, mode: str, entry: int, *, stack: int = layout.BOOT_STACK_TOP,
             rsi: int = 0) -> None:
    """Put ``vcpu`` in ``mode`` about to execute at ``entry`` (a physical address;
    in real mode it becomes CS:IP with CS = entry >> 4)."""
    if mode not in MODES:
        raise ConfigError(f"unknown entry mode {mode!r} (choose from {', '.join(MODES)})")
    sregs = vcpu.get_sregs()
    regs = vcpu.get_regs()
    for name, _ in type(regs)._fields_:
        setattr(regs, name, 0)
    regs.rflags = 0x2
    regs.rsp = stack
    regs.rsi = rsi
    if mode == "real":
        if entry & 0xF or entry >= 0x100000:
            raise ConfigError(f"real-mode entry {entry:#x} must be paragraph-aligned below 1 MiB")
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segment = getattr(sregs, name)
            segment.selector, segment.base = entry >> 4, entry
        regs.rip = 0
        # Real mode sees one 64 KiB segment from the load address: code and data at
        # its bottom, the stack at its top (a .COM program's layout).
        regs.rsp = 0xFFFE
    else:
        write_boot_gdt(memory)
        sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE
        if mode == "protected":
            _load_flat_segments(sregs, CODE32_SELECTOR)
        else:
            write_identity_page_tables(memory)
            _load_flat_segments(sregs, CODE64_SELECTOR)
            sregs.cr3 = layout.PML4_ADDR
            sregs.cr4 |= CR4_PAE
            sregs.cr0 |= CR0_PG
            sregs.efer |= EFER_LME | EFER_LMA
        regs.rip = entry
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
