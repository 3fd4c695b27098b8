"""A tiny classic-BPF assembler: just what a seccomp filter needs.

A seccomp filter is a classic BPF program (``linux/filter.h``) run by the
kernel on ``struct seccomp_data`` (``linux/seccomp.h``) at every system call.
Conditional jumps are forward only and their offsets are 8 bits wide, so the
assembler resolves symbolic labels and refuses a jump it cannot encode rather
than silently wrapping it (a wrapped offset would allow the wrong call).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# --- opcodes (include/uapi/linux/bpf_common.h) -------------------------------------------
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00
BPF_AND = 0x50
BPF_JA, BPF_JEQ, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x30, 0x40

LD_ABS = BPF_LD | BPF_W | BPF_ABS
AND_K = BPF_ALU | BPF_AND | BPF_K
JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
JGE_K = BPF_JMP | BPF_JGE | BPF_K
JSET_K = BPF_JMP | BPF_JSET | BPF_K
RET_K = BPF_RET | BPF_K

# --- struct seccomp_data offsets (include/uapi/linux/seccomp.h) -------------------------
DATA_NR = 0
DATA_ARCH = 4
DATA_IP = 8


def data_arg_low(index: int) -> int:
    """Offset of the low 32 bits of argument ``index`` (x86-64 is little-endian)."""
    if not 0 <= index < 6:
        raise ValueError(f"system calls have arguments 0..5, not {index}")
    return 16 + 8 * index


SOCK_FILTER = struct.Struct("<HBBI")   # struct sock_filter: code, jt, jf, k
MAX_INSNS = 4096                        # BPF_MAXINSNS


class BpfError(ValueError):
    """A program the kernel would reject or misread (jump too far, unknown label)."""


@dataclass(frozen=True)
class _Insn:
    code: int
    k: int
    true: str | None = None     # label of a conditional jump's taken branch (None: next)
    false: str | None = None


class Program:
    """Build a program instruction by instruction, then :meth:`assemble` it."""

    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._insns)

    def label(self, name: str) -> None:
        if name in self._labels:
            raise BpfError(f"label {name!r} defined twice")
        self._labels[name] = len(self._insns)

    def load(self, offset: int) -> None:
        """A = the 32-bit word of seccomp_data at ``offset``."""
        self._insns.append(_Insn(LD_ABS, offset))

    def and_(self, mask: int) -> None:
        self._insns.append(_Insn(AND_K, mask))

    def jeq(self, value: int, true: str | None = None, false: str | None = None) -> None:
        self._insns.append(_Insn(JEQ_K, value, true, false))

    def jge(self, value: int, true: str | None = None, false: str | None = None) -> None:
        self._insns.append(_Insn(JGE_K, value, true, false))

    def jset(self, mask: int, true: str | None = None, false: str | None = None) -> None:
        self._insns.append(_Insn(JSET_K, mask, true, false))

    def ret(self, value: int) -> None:
        self._insns.append(_Insn(RET_K, value))

    def _offset(self, at: int, label: str | None) -> int:
        if label is None:
            return 0
        if label not in self._labels:
            raise BpfError(f"jump to undefined label {label!r}")
        offset = self._labels[label] - at - 1
        if not 0 <= offset <= 255:
            raise BpfError(f"jump from {at} to {label!r} spans {offset} instructions "
                           f"(classic BPF allows 0..255, forward only)")
        return offset

    def assemble(self) -> bytes:
        if not self._insns or self._insns[-1].code != RET_K:
            raise BpfError("a filter must end with a return")
        if len(self._insns) > MAX_INSNS:
            raise BpfError(f"{len(self._insns)} instructions (the kernel allows {MAX_INSNS})")
        return b"".join(
            SOCK_FILTER.pack(insn.code, self._offset(at, insn.true),
                             self._offset(at, insn.false), insn.k & 0xFFFFFFFF)
            for at, insn in enumerate(self._insns))


def run(program: bytes, data: bytes, executed: list[int] | None = None) -> int:
    """Interpret an assembled program on one ``seccomp_data`` (tests use it to check a
    filter's decisions without installing it; it knows only the opcodes above).
    ``executed``, if given, receives the index of each instruction run."""
    insns = [SOCK_FILTER.unpack_from(program, at) for at in range(0, len(program), 8)]
    pc = acc = 0
    while True:
        code, jt, jf, k = insns[pc]
        if executed is not None:
            executed.append(pc)
        pc += 1
        if code == LD_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == AND_K:
            acc &= k
        elif code == RET_K:
            return k
        elif code in (JEQ_K, JGE_K, JSET_K):
            taken = acc == k if code == JEQ_K else acc >= k if code == JGE_K else bool(acc & k)
            pc += jt if taken else jf
        else:
            raise BpfError(f"opcode {code:#x} not known to this interpreter")
