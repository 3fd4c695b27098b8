"""Where the vCPU is executing, and the instruction bytes there."""

from __future__ import annotations

from ..errors import GuestMemoryError, PykvmError

CR0_PG = 1 << 31
EFER_LMA = 1 << 10
MAX_INSN_LEN = 15


def linear_rip(regs, sregs) -> int:
    """The linear address of RIP: CS.base + RIP outside 64-bit mode."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return regs.rip
    return (sregs.cs.base + regs.rip) & 0xFFFFFFFF


def linear_to_physical(vcpu, sregs, linear: int) -> int:
    if not sregs.cr0 & CR0_PG:
        return linear
    from .pagewalk import translate  # the guest's own page tables, walked by pykvm

    physical = translate(vcpu.memory, sregs, linear)
    if physical is None:
        raise PykvmError(f"guest address {linear:#x} is not mapped")
    return physical


def read_linear(vcpu, sregs, linear: int, length: int) -> bytes:
    """Bytes at a guest-linear address; stops early at an unmapped page."""
    out = bytearray()
    while len(out) < length:
        address = linear + len(out)
        chunk = min(length - len(out), 0x1000 - (address & 0xFFF))
        try:
            physical = linear_to_physical(vcpu, sregs, address)
            out += vcpu.memory.read(physical, chunk)
        except (PykvmError, GuestMemoryError):
            if not out:
                raise
            break
    return bytes(out)


def code_at_rip(vcpu, regs=None, sregs=None, length: int = MAX_INSN_LEN) -> tuple[int, bytes]:
    """(RIP, the instruction bytes at it) for the vCPU's current state."""
    regs = regs or vcpu.get_regs()
    sregs = sregs or vcpu.get_sregs()
    return regs.rip, read_linear(vcpu, sregs, linear_rip(regs, sregs), length)
