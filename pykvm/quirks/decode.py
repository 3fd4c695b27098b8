"""A small x86 instruction decoder of pykvm's own: length, opcode, ModRM and memory operand.

pykvm completes the instructions kvm_pvm's emulator refuses (complete.py). To do
that it needs what the instruction is (its opcode bytes and ModRM.reg, which
selects the operation within a group such as 0f ae), how long it is (RIP moves
past it) and, for a memory form, the effective address: ModRM, SIB,
displacement, REX.B/X/R and RIP-relative addressing, as the Intel SDM vol. 2
ch. 2 ("Instruction Format") defines them. capstone could tell all that too, but
it is an optional dependency (tracing) and the completions must not need it.

The decoder covers 64-bit and 32-bit code with 32/64-bit addressing: the encodings
a kernel runs in ring 0. 16-bit addressing (real mode, or a 67 prefix in 32-bit
code) is not decoded (None): no completion needs it. The bytes are guest memory,
so a truncated or malformed instruction gives None, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LENGTH = 15   # SDM vol. 2 2.3.11: a longer instruction is #GP

# Legacy prefixes (SDM vol. 2 2.1.1), in any order, each at most once in practice.
OPERAND_SIZE, ADDRESS_SIZE, LOCK, REPNE, REP = 0x66, 0x67, 0xF0, 0xF2, 0xF3
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
LEGACY_PREFIXES = frozenset({OPERAND_SIZE, ADDRESS_SIZE, LOCK, REPNE, REP, *SEGMENT_PREFIXES})

# The general registers in ModRM/SIB/REX numbering, as kvm_regs names them.
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
RSP, RBP = 4, 5


def _ranges(*spans: tuple[int, int]) -> frozenset[int]:
    return frozenset(b for first, last in spans for b in range(first, last + 1))


# One-byte opcode map (SDM vol. 2 appendix A.3, table A-2): which opcodes take a ModRM byte.
ONE_BYTE_MODRM = _ranges(
    (0x00, 0x03), (0x08, 0x0B), (0x10, 0x13), (0x18, 0x1B), (0x20, 0x23), (0x28, 0x2B),
    (0x30, 0x33), (0x38, 0x3B), (0x62, 0x63), (0x69, 0x69), (0x6B, 0x6B), (0x80, 0x8F),
    (0xC0, 0xC1), (0xC4, 0xC7), (0xD0, 0xD3), (0xD8, 0xDF), (0xF6, 0xF7), (0xFE, 0xFF))
# Immediate bytes after the opcode (and ModRM): "z" is 2 or 4 by operand size, "v" 2/4/8.
ONE_BYTE_IMM8 = _ranges((0x6A, 0x6B), (0x70, 0x7F), (0x80, 0x80), (0x82, 0x83), (0xA8, 0xA8),
                        (0xB0, 0xB7), (0xC0, 0xC1), (0xC6, 0xC6), (0xCD, 0xCD), (0xD4, 0xD5),
                        (0xE0, 0xE7), (0xEB, 0xEB)) | {0x04 + 8 * i for i in range(8)}
ONE_BYTE_IMMZ = _ranges((0x68, 0x69), (0x81, 0x81), (0xA9, 0xA9), (0xC7, 0xC7),
                        (0xE8, 0xE9)) | {0x05 + 8 * i for i in range(8)}
ONE_BYTE_IMM16 = frozenset({0xC2, 0xCA})
# Two-byte map (0f xx, table A-3): these take no ModRM; everything else does.
TWO_BYTE_NO_MODRM = _ranges((0x04, 0x0C), (0x0E, 0x0E), (0x30, 0x37), (0x77, 0x77),
                            (0x80, 0x8F), (0xA0, 0xA2), (0xA8, 0xAA), (0xC8, 0xCF))
TWO_BYTE_IMM8 = _ranges((0x70, 0x73), (0xC4, 0xC6)) | {0xA4, 0xAC, 0xBA, 0xC2}
TWO_BYTE_REL32 = _ranges((0x80, 0x8F))


@dataclass(frozen=True)
class MemoryOperand:
    """A ModRM memory operand: segment:[base + index * scale + displacement]."""

    segment: str | None        # an override prefix's segment, None for the default
    base: int | None           # GPR number, None without one (or RIP-relative)
    index: int | None
    scale: int
    displacement: int          # sign-extended
    rip_relative: bool
    address_bits: int          # 64 or 32: the effective address wraps there


@dataclass(frozen=True)
class Instruction:
    """What the completions need of one decoded instruction."""

    length: int
    prefixes: bytes            # the legacy prefixes, in order
    rex: int                   # 0 without a REX prefix
    opcode: bytes              # 1 to 3 bytes: cc, 0f ae, 0f 38 f1, ...
    modrm: int | None
    immediate: int | None      # unsigned, as encoded
    memory: MemoryOperand | None   # a ModRM memory form (mod != 3)

    @property
    def mod(self) -> int | None:
        return None if self.modrm is None else self.modrm >> 6

    @property
    def reg(self) -> int | None:
        """ModRM.reg without REX.R: the /digit of group opcodes."""
        return None if self.modrm is None else (self.modrm >> 3) & 7

    @property
    def rm(self) -> int | None:
        return None if self.modrm is None else self.modrm & 7

    @property
    def lock(self) -> bool:
        return LOCK in self.prefixes

    @property
    def rex_w(self) -> bool:
        return bool(self.rex & 8)


def decode(code: bytes, bits: int = 64) -> Instruction | None:
    """The instruction at the start of ``code`` in ``bits``-bit code (64 or 32)."""
    if bits not in (32, 64):
        return None
    try:
        return _decode(code[:MAX_LENGTH], bits)
    except IndexError:        # the bytes ran out: truncated, or longer than 15 bytes
        return None


def _decode(code: bytes, bits: int) -> Instruction | None:
    i = 0
    while code[i] in LEGACY_PREFIXES:
        i += 1
    prefixes = code[:i]
    rex = 0
    if bits == 64 and 0x40 <= code[i] <= 0x4F:   # REX must come right before the opcode
        rex = code[i]
        i += 1
    if code[i] in (0xC4, 0xC5, 0x62) and (bits == 64 or code[i + 1] >= 0xC0):
        return None   # VEX/EVEX (SDM vol. 2 2.3.5): nothing completed is VEX-encoded
    operand_16 = OPERAND_SIZE in prefixes
    first = code[i]
    immediate_size = 0
    if first == 0x0F:
        second = code[i + 1]
        if second in (0x38, 0x3A):
            opcode = code[i:i + 3]
            has_modrm = True
            immediate_size = 1 if second == 0x3A else 0
        else:
            opcode = code[i:i + 2]
            has_modrm = second not in TWO_BYTE_NO_MODRM
            if second in TWO_BYTE_IMM8:
                immediate_size = 1
            elif second in TWO_BYTE_REL32:
                immediate_size = 2 if operand_16 and bits == 32 else 4
    else:
        opcode = code[i:i + 1]
        has_modrm = first in ONE_BYTE_MODRM
        immediate_size = _one_byte_immediate(first, code, i, rex, operand_16, prefixes, bits)
    i += len(opcode)
    modrm = memory = None
    if has_modrm:
        modrm = code[i]
        i += 1
        if modrm >> 6 != 3:
            memory, i = _memory_operand(code, i, modrm, rex, prefixes, bits)
            if memory is None:
                return None
    if first == 0xF6 or first == 0xF7:   # group 3: only test (/0, /1) has an immediate
        if modrm is not None and (modrm >> 3) & 7 <= 1:
            immediate_size = 1 if first == 0xF6 else (2 if operand_16 else 4)
    immediate = None
    if immediate_size:
        if len(code) < i + immediate_size:
            return None
        immediate = int.from_bytes(code[i:i + immediate_size], "little")
        i += immediate_size
    return Instruction(i, bytes(prefixes), rex, bytes(opcode), modrm, immediate, memory)


def _one_byte_immediate(op: int, code: bytes, i: int, rex: int, operand_16: bool,
                        prefixes: bytes, bits: int) -> int:
    z = 2 if operand_16 else 4
    if op in ONE_BYTE_IMM8:
        return 1
    if op in ONE_BYTE_IMMZ:
        return z
    if op in ONE_BYTE_IMM16:
        return 2
    if op == 0xC8:                       # enter imm16, imm8
        return 3
    if 0xB8 <= op <= 0xBF:               # mov reg, imm: the only 8-byte immediate (REX.W)
        return 8 if rex & 8 else z
    if 0xA0 <= op <= 0xA3:               # mov moffs: an address-sized offset
        wide = bits == 64 and ADDRESS_SIZE not in prefixes
        return 8 if wide else 4
    return 0


def _memory_operand(code: bytes, i: int, modrm: int, rex: int, prefixes: bytes,
                    bits: int) -> tuple[MemoryOperand | None, int]:
    """Decode SIB and displacement after ``modrm`` (SDM vol. 2 tables 2-2, 2-3; 2.2.1.3
    for REX; 2.2.1.6 for RIP-relative addressing)."""
    address_bits = bits
    if ADDRESS_SIZE in prefixes:
        address_bits = 32 if bits == 64 else 16
    if address_bits == 16:
        return None, i
    mod, rm = modrm >> 6, modrm & 7
    segment = next((SEGMENT_PREFIXES[p] for p in reversed(prefixes) if p in SEGMENT_PREFIXES),
                   None)
    base = index = None
    scale = 1
    rip_relative = False
    displacement_size = {0: 0, 1: 1, 2: 4}[mod]
    if rm == RSP:                        # a SIB byte follows
        sib = code[i]
        i += 1
        scale = 1 << (sib >> 6)
        sib_index = ((sib >> 3) & 7) | (8 if rex & 2 else 0)
        index = None if sib_index == RSP else sib_index   # 100b without REX.X: no index
        sib_base = sib & 7
        if sib_base == RBP and mod == 0:                  # no base, disp32
            displacement_size = 4
        else:
            base = sib_base | (8 if rex & 1 else 0)
    elif rm == RBP and mod == 0:
        displacement_size = 4
        rip_relative = bits == 64        # disp32 alone in 32-bit code; RIP + disp32 in 64-bit
    else:
        base = rm | (8 if rex & 1 else 0)
    raw = code[i:i + displacement_size]
    if len(raw) < displacement_size:
        raise IndexError("displacement cut short")
    displacement = int.from_bytes(raw, "little", signed=True)
    i += displacement_size
    return MemoryOperand(segment, base, index, scale, displacement, rip_relative,
                         address_bits), i


def effective_address(instruction: Instruction, memory: MemoryOperand, regs,
                      rip: int) -> int:
    """The operand's offset within its segment. ``rip`` is the instruction's own address:
    a RIP-relative displacement counts from the next instruction."""
    address = memory.displacement
    if memory.rip_relative:
        address += rip + instruction.length
    if memory.base is not None:
        address += getattr(regs, GPR_NAMES[memory.base])
    if memory.index is not None:
        address += getattr(regs, GPR_NAMES[memory.index]) * memory.scale
    return address & ((1 << memory.address_bits) - 1)


def default_segment(memory: MemoryOperand) -> str:
    """SS for rSP/rBP-based operands, DS otherwise (SDM vol. 1 3.7.4), unless overridden."""
    if memory.segment is not None:
        return memory.segment
    return "ss" if memory.base in (RSP, RBP) else "ds"
