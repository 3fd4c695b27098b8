"""The guest's interrupt descriptor table: where vector N's handler is.

Read through the guest's own page tables from ``sregs.idt``, in the format the
CPU uses for the current mode: 16-byte gates in long mode, 8-byte gates in
protected mode, and the real-mode interrupt vector table (segment:offset pairs)
with CR0.PE clear. Guest memory is untrusted: a vector beyond the IDT limit, an
unmapped table or a gate whose code segment cannot be read gives None.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..boot.modes import segment_from_descriptor
from ..ioctl.structs import kvm_segment
from .pagewalk import EFER_LMA, read_linear

CR0_PE = 1 << 0

TASK_GATE = 0x5
INTERRUPT_GATE_16, TRAP_GATE_16 = 0x6, 0x7
INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF   # 32-bit gates in protected mode, 64-bit in long mode

SELECTOR_TI = 1 << 2   # the selector names an LDT descriptor


@dataclass(frozen=True)
class Gate:
    vector: int
    handler: int     # linear address of the handler's first instruction (0 for a task gate)
    selector: int
    type: int
    dpl: int
    present: bool
    ist: int = 0     # long mode: the TSS interrupt stack the CPU switches to (0: none)


def gate_size(sregs) -> int:
    if not sregs.cr0 & CR0_PE:
        return 4
    return 16 if sregs.efer & EFER_LMA else 8


def read_gate(memory, sregs, vector: int) -> Gate | None:
    """Gate ``vector`` (0..255) of the IDT ``sregs.idt`` describes, or None."""
    size = gate_size(sregs)
    if not 0 <= vector <= 255 or vector * size + size - 1 > sregs.idt.limit:
        return None
    raw = read_linear(memory, sregs, sregs.idt.base + vector * size, size)
    if raw is None:
        return None
    if size == 4:  # real mode: offset, segment
        offset, segment = struct.unpack("<HH", raw)
        return Gate(vector, (segment << 4) + offset, segment, 0, 0, True)

    offset_low, selector, ist, attributes, offset_mid = struct.unpack_from("<HHBBH", raw)
    gate_type = attributes & 0xF
    dpl = (attributes >> 5) & 3
    present = bool(attributes >> 7)
    if size == 16:
        offset = offset_low | (offset_mid << 16) | (struct.unpack_from("<I", raw, 8)[0] << 32)
        # A 64-bit gate's selector must name a 64-bit code segment, whose base is ignored.
        return Gate(vector, offset, selector, gate_type, dpl, present, ist & 7)

    if gate_type == TASK_GATE:
        return Gate(vector, 0, selector, gate_type, dpl, present)
    offset = offset_low if gate_type in (INTERRUPT_GATE_16, TRAP_GATE_16) \
        else offset_low | (offset_mid << 16)
    base = code_segment_base(memory, sregs, selector)
    if base is None:
        return None
    return Gate(vector, (base + offset) & 0xFFFFFFFF, selector, gate_type, dpl, present)


def code_segment_base(memory, sregs, selector: int) -> int | None:
    """The base of the GDT segment ``selector`` names (LDT selectors are not followed)."""
    index = selector & ~7
    if selector & SELECTOR_TI or index + 7 > sregs.gdt.limit:
        return None
    raw = read_linear(memory, sregs, sregs.gdt.base + index, 8)
    if raw is None:
        return None
    segment = kvm_segment()
    segment_from_descriptor(segment, selector, int.from_bytes(raw, "little"))
    return segment.base
