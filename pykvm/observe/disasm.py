"""x86 decoding for the tracer and for pykvm's instruction completion (quirks).

Two decoders, on purpose: :func:`decode_io` knows only the port-I/O
instructions (in/out/ins/outs, SDM vol. 2 "IN", "OUT", "INS", "OUTS") and needs
nothing installed, so a trace can name the instruction behind every port-I/O
exit anywhere; :class:`Disassembler` decodes anything through capstone when it
is installed (``pip install 'pykvm[trace]'``) and gives raw bytes otherwise.
The CPU mode that decides the operand size comes from :func:`cpu_bits`
(SDM vol. 3A 5.2: CS.L in IA-32e mode, CS.D otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import sandbox

CR0_PE = 1 << 0
EFER_LMA = 1 << 10

_IO_OPCODES = {  # opcode -> (direction 1=out, byte-sized, imm8 port, string)
    0xE4: (0, True, True, False), 0xE5: (0, False, True, False),
    0xE6: (1, True, True, False), 0xE7: (1, False, True, False),
    0xEC: (0, True, False, False), 0xED: (0, False, False, False),
    0xEE: (1, True, False, False), 0xEF: (1, False, False, False),
    0x6C: (0, True, False, True), 0x6D: (0, False, False, True),
    0x6E: (1, True, False, True), 0x6F: (1, False, False, True),
}
_LEGACY_PREFIXES = {0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65}


@dataclass(frozen=True)
class IoInstruction:
    length: int
    direction: int      # 1 = out
    size: int           # bytes per access
    port: int | None    # the imm8 port, or None for the DX forms
    string: bool


def decode_io(code: bytes, bits: int) -> IoInstruction | None:
    """Decode a port-I/O instruction (in/out/ins/outs) at the start of ``code``."""
    operand_16 = bits == 16
    i = 0
    while i < len(code) and i < 4 and code[i] in _LEGACY_PREFIXES:
        if code[i] == 0x66:
            operand_16 = not operand_16 if bits != 16 else False
        i += 1
    if bits == 64 and i < len(code) and 0x40 <= code[i] <= 0x4F:
        i += 1
    if i >= len(code) or code[i] not in _IO_OPCODES:
        return None
    direction, byte_sized, imm, string = _IO_OPCODES[code[i]]
    length = i + 1 + (1 if imm else 0)
    if length > len(code):
        return None
    size = 1 if byte_sized else (2 if operand_16 else 4)
    return IoInstruction(length, direction, size, code[i + 1] if imm else None, string)


@dataclass
class Instruction:
    length: int | None          # None: not decoded (no capstone), text is raw bytes
    text: str
    code: bytes
    memory: tuple = ()          # capstone memory operands: (segment, base, index, scale, disp)


class Disassembler:
    """capstone when installed (pip install 'pykvm[trace]'), raw bytes otherwise."""

    def __init__(self, use_capstone: bool = True):
        self._engines = {}
        self.cache: dict[tuple[int, int], Instruction] = {}
        self.available = False
        if use_capstone:
            try:    # a confined thread cannot import capstone itself
                capstone = sandbox.import_unconfined("capstone")
            except ImportError:
                return
            for bits, mode in ((16, capstone.CS_MODE_16), (32, capstone.CS_MODE_32),
                               (64, capstone.CS_MODE_64)):
                engine = capstone.Cs(capstone.CS_ARCH_X86, mode)
                engine.detail = True
                self._engines[bits] = engine
            self._mem_type = capstone.x86.X86_OP_MEM
            self.available = True

    def decode(self, code: bytes, address: int, bits: int, key: int | None = None,
               length_hint: int | None = None) -> Instruction | None:
        """The instruction at the start of ``code``; ``key`` (its guest-physical
        address) caches it."""
        if key is not None:
            cached = self.cache.get((key, bits))
            if cached is not None and code.startswith(cached.code):
                return cached
        insn = self._decode(code, address, bits, length_hint)
        if insn is not None and key is not None:
            if len(self.cache) > 65536:
                self.cache.clear()
            self.cache[(key, bits)] = insn
        return insn

    def _decode(self, code: bytes, address: int, bits: int, length_hint: int | None):
        engine = self._engines.get(bits)
        if engine is None:
            if length_hint is None:
                return None
            raw = code[:length_hint]
            return Instruction(None, raw.hex(" "), raw)
        for insn in engine.disasm(code, address, 1):
            memory = []
            for op in insn.operands:
                if op.type == self._mem_type:
                    mem = op.mem
                    memory.append((insn.reg_name(mem.segment) if mem.segment else None,
                                   insn.reg_name(mem.base) if mem.base else None,
                                   insn.reg_name(mem.index) if mem.index else None,
                                   mem.scale, mem.disp))
            text = f"{insn.mnemonic} {insn.op_str}".strip()
            return Instruction(insn.size, text, bytes(insn.bytes), tuple(memory))
        return None


_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")


def register_value(regs, name: str) -> int | None:
    """A general register by any of its names (rax, eax, ax, r8d, r8w, rip, eip, ip)."""
    if name in _GPR64 or name == "rip" or (name[0] == "r" and name[1:].isdigit()):
        return getattr(regs, name)
    if name[0] == "r" and name[-1] in "dwb" and name[1:-1].isdigit():
        bits = {"d": 32, "w": 16, "b": 8}[name[-1]]
        return getattr(regs, name[:-1]) & ((1 << bits) - 1)
    if len(name) == 3 and name[0] == "e":
        full = "r" + name[1:]
        if full in _GPR64 or full == "rip":
            return getattr(regs, full) & 0xFFFFFFFF
    if len(name) == 2:
        full = "r" + name
        if full in _GPR64 or full == "rip":
            return getattr(regs, full) & 0xFFFF
    return None


def cpu_bits(sregs) -> int:
    """16, 32 or 64: the default operand size of the code the vCPU executes."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    if sregs.cr0 & CR0_PE and sregs.cs.db:
        return 32
    return 16
