"""`pykvm run --trace`: one line per exit that reaches pykvm, with the guest
instruction that caused it.

The vCPU run loop calls :meth:`Tracer.pio`, :meth:`Tracer.mmio` and
:meth:`Tracer.exit` on the vCPU thread after pykvm handled the exit and before
the next KVM_RUN, so the tracer may read the vCPU's registers and walk the
guest's page tables: :mod:`.locate` finds the instruction (and says whether
KVM had already moved RIP past it), :mod:`.trace_filter` decides which exits
get a line, and this module only formats and writes them. The stream is the
output the user asked for (a file or stderr), not a log.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

from ..errors import PykvmError
from ..ioctl.requests import EXIT_NAMES
from .disasm import Disassembler
from . import output
from .locate import InstructionLocator, Located
from .trace_filter import TraceFilter


@dataclass
class Tracer:
    """Writes one line per exit to ``out`` (a text stream). Safe from several vCPU threads."""

    out: object = None
    filter: TraceFilter = field(default_factory=TraceFilter)
    symbols: object = None                  # a symbols.SymbolTable
    disassemble: bool = True                # read and decode the instruction
    use_capstone: bool = True
    header: bool = True

    def __post_init__(self):
        self.out = self.out if self.out is not None else sys.stderr
        self.locator = InstructionLocator(Disassembler(self.use_capstone))
        self.start_ns: int | None = None
        self.lines = 0
        self._lock = threading.Lock()
        self._owned = None

    @classmethod
    def to_path(cls, path: str | None, **options) -> "Tracer":
        """A tracer writing to ``path`` ('-' or None: stderr), created as output.py says."""
        if path in (None, "", "-"):
            return cls(sys.stderr, **options)
        stream = output.create(path, "--trace")
        tracer = cls(stream, **options)
        tracer._owned = stream
        return tracer

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    # -- called by the vCPU run loop ----------------------------------------------------------
    def pio(self, vcpu, t0, t1, t_end, port, size, direction, count, value, device) -> None:
        if not self.filter.pio(vcpu.id, port, direction, device):
            return
        access = f"{'out' if direction else 'in':<3} port={port:#x} size={size} " \
                 f"value={_value(value, size)}{f' x{count}' if count > 1 else ''}"
        where = self._locate(lambda: self.locator.pio(vcpu, port, size, direction))
        self._emit(vcpu, t0, t1, t_end, "io", access, device, where)

    def mmio(self, vcpu, t0, t1, t_end, addr, length, is_write, value, device) -> None:
        if not self.filter.mmio(vcpu.id, addr, is_write, device):
            return
        access = f"{'write' if is_write else 'read'} addr={addr:#x} size={length} " \
                 f"value={_value(value, length)}"
        where = self._locate(lambda: self.locator.mmio(vcpu, addr, is_write))
        self._emit(vcpu, t0, t1, t_end, "mmio", access, device, where)

    def exit(self, vcpu, t0, t1, t_end, reason) -> None:
        name = EXIT_NAMES.get(reason, str(reason))
        if not self.filter.other(vcpu.id, name):
            return
        detail = ""
        if name == "internal_error":
            detail = f"suberror={vcpu.run_struct.internal.suberror}"
        elif name == "debug":
            arch = vcpu.run_struct.debug.arch
            detail = f"exception={arch.exception} pc={arch.pc:#x}"
        where = self._locate(lambda: self.locator.at_rip(vcpu))
        self._emit(vcpu, t0, t1, t_end, name, detail, None, where)

    # -- formatting ------------------------------------------------------------------------------
    def _locate(self, find) -> Located | None:
        if not self.disassemble:
            return None
        try:
            return find()
        except PykvmError as error:
            return Located(0, None, None, f"({error})")

    def _emit(self, vcpu, t0, t1, t_end, reason, access, device, where) -> None:
        if self.start_ns is None:
            self.start_ns = vcpu.stats.started_ns or t0
        line = f"{(t1 - self.start_ns) / 1e9:12.6f} cpu{vcpu.id} {reason:<5} {access}"
        if reason in ("io", "mmio"):
            line += f" dev={device or '-'}"
        line += f" guest={(t1 - t0) / 1e3:.1f}us pykvm={(t_end - t1) / 1e3:.1f}us"
        if where is not None:
            line += "  " + self.describe(where)
        with self._lock:
            if self.header:
                self.header = False
                self.out.write("# pykvm trace: seconds since start, vCPU, exit reason, access, "
                               "device, time in KVM_RUN before the exit, time pykvm took, "
                               "the instruction (rip:at = RIP still points at it, rip:past = KVM "
                               "already moved RIP past it) and its symbol\n")
            self.out.write(line + "\n")
            self.lines += 1

    def describe(self, where: Located) -> str:
        text = f"{where.rip:#x}"
        if where.past is not None:
            text += " rip:past" if where.past else " rip:at"
        if where.insn is not None:
            text += f" {where.insn.text}"
        if where.note:
            text += f" [{where.note}]"
        if self.symbols is not None and where.insn is not None:
            name = self.symbols.format(where.rip)
            if name:
                text += f" <{name}>"
        return text


def _value(value: int, size: int) -> str:
    text = f"{value:#x}"
    if size == 1 and 0x20 <= value < 0x7F:
        text += f" {chr(value)!r}"
    elif size == 1 and value in (0x0A, 0x0D, 0x09):
        text += " " + {0x0A: "'\\n'", 0x0D: "'\\r'", 0x09: "'\\t'"}[value]
    return text
