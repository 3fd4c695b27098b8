"""`pykvm run --trace`: one line per exit that reaches pykvm, with the guest
instruction that caused it.

The vCPU run loop calls :meth:`Tracer.pio`, :meth:`Tracer.mmio` and
:meth:`Tracer.exit` on the vCPU thread after pykvm handled the exit and before
the next KVM_RUN, so the tracer may read the vCPU's registers (KVM_GET_REGS,
KVM_GET_SREGS) and walk the guest's own page tables to find the instruction.

Where RIP points at an exit (measured; see tests/test_trace.py). KVM finishes
an instruction that needed user space in one of two ways:

- *after* user space answered: RIP still points at the instruction when
  KVM_RUN returns, and KVM moves it on during the next KVM_RUN. Always so for
  ``in``/``ins`` and MMIO reads (KVM still has to put the value in a register),
  and, by KVM's source, for ``in``/``out`` on a VT-x/AMD-V host's fast
  port-I/O path (complete_fast_pio_out);
- *before* it exited: KVM's instruction emulator writes RIP back as soon as the
  instruction is done from the guest's point of view. So for MMIO writes, and
  for ``out``/``outs`` wherever the emulator ran them: measured on kvm_pvm for
  guest ring-0 code in real, protected and long mode, and for ring-3 MMIO.

So the tracer looks at RIP first and, when the instruction there cannot have
caused this exit, at the instruction that *ends* at RIP; when both could have
(``out dx, al`` twice in a row), it goes with what it saw this host do for that
kind of exit before. The line says which it was: ``rip:at`` or ``rip:past``.

Decoded instructions are cached by guest-physical address (checked against the
bytes on each use, so self-modifying code is still shown right): a trace costs
two register reads, a page walk and a dictionary look-up per exit.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from .. import ioctl as k
from ..errors import ConfigError, GuestMemoryError, PykvmError
from ..guest.code import MAX_INSN_LEN, linear_to_physical
from ..ioctl.requests import EXIT_NAMES

_SYNC = k.KVM_SYNC_X86_REGS | k.KVM_SYNC_X86_SREGS
CR0_PE = 1 << 0
EFER_LMA = 1 << 10

# --- filters ---------------------------------------------------------------------------------
FILTER_HELP = (
    "TERMS are space-separated KEY=VALUES, all of which must hold; VALUES is a comma-separated "
    "list, any of which may match; LOW-HIGH ranges include both ends; numbers are decimal or "
    "0x-hex. Keys: reason=io,mmio,hlt,internal_error,... (exit reasons, KVM_EXIT_* in lower "
    "case); port=0x3f8-0x3ff (port-I/O exits at these ports); addr=0xd0000000-0xd0000fff "
    "(MMIO exits at these guest-physical addresses); device=serial,none (the device that "
    "handled it; none: no device); dir=in,out,read,write; vcpu=0,1. port= limits port-I/O "
    "exits and addr= MMIO exits; without reason=, they also select only the kinds they name. "
    "Repeatable. Example: --trace-filter 'reason=io,mmio port=0x3f8-0x3ff "
    "addr=0xd0000000-0xd0000fff'")

_REASON_ALIASES = {"pio": "io", "port": "io"}
_DIRECTIONS = {"in": "in", "read": "in", "out": "out", "write": "out"}


def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"--trace-filter {what}: {text!r} is not a number") from None


def _ranges(values: list[str], what: str) -> list[tuple[int, int]]:
    ranges = []
    for value in values:
        low, _, high = value.partition("-")
        lo = _number(low, what)
        hi = _number(high, what) if high else lo
        if hi < lo:
            raise ConfigError(f"--trace-filter {what}={value}: the range ends before it starts")
        ranges.append((lo, hi))
    return ranges


@dataclass
class TraceFilter:
    reasons: set[str] | None = None
    ports: list[tuple[int, int]] | None = None
    addrs: list[tuple[int, int]] | None = None
    devices: set[str] | None = None
    directions: set[str] | None = None
    vcpus: set[int] | None = None

    @classmethod
    def parse(cls, specs: list[str] | str | None) -> "TraceFilter":
        if isinstance(specs, str):
            specs = [specs]
        terms: dict[str, list[str]] = {}
        for spec in specs or []:
            for term in spec.split():
                key, sep, values = term.partition("=")
                if not sep or not values:
                    raise ConfigError(f"--trace-filter {term!r}: want KEY=VALUES, "
                                      f"e.g. port=0x3f8-0x3ff")
                terms.setdefault(key.lower(), []).extend(v for v in values.split(",") if v)
        known = set(EXIT_NAMES.values())
        result = cls()
        for key, values in terms.items():
            if key == "reason":
                reasons = {_REASON_ALIASES.get(v.lower(), v.lower()) for v in values}
                unknown = reasons - known
                if unknown:
                    raise ConfigError(f"--trace-filter reason={','.join(sorted(unknown))}: unknown "
                                      f"exit reason (known: {', '.join(sorted(known))})")
                result.reasons = reasons
            elif key == "port":
                result.ports = _ranges(values, key)
            elif key in ("addr", "address"):
                result.addrs = _ranges(values, key)
            elif key in ("device", "dev"):
                result.devices = set(values)
            elif key in ("dir", "direction"):
                bad = [v for v in values if v.lower() not in _DIRECTIONS]
                if bad:
                    raise ConfigError(f"--trace-filter dir={bad[0]}: use in, out, read or write")
                result.directions = {_DIRECTIONS[v.lower()] for v in values}
            elif key in ("vcpu", "cpu"):
                result.vcpus = {_number(v, key) for v in values}
            else:
                raise ConfigError(f"--trace-filter: unknown key {key!r} "
                                  f"(use reason, port, addr, device, dir, vcpu)")
        if result.reasons is None and (result.ports is not None or result.addrs is not None):
            result.reasons = ({"io"} if result.ports is not None else set()) \
                | ({"mmio"} if result.addrs is not None else set())
        return result

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.reasons, self.ports, self.addrs, self.devices,
                                        self.directions, self.vcpus))

    def _common(self, vcpu_id: int, reason: str, device: str | None, direction: str | None) -> bool:
        if self.vcpus is not None and vcpu_id not in self.vcpus:
            return False
        if self.reasons is not None and reason not in self.reasons:
            return False
        if self.devices is not None and (device or "none") not in self.devices:
            return False
        if self.directions is not None and direction not in self.directions:
            return False
        return True

    def pio(self, vcpu_id: int, port: int, direction: int, device: str | None) -> bool:
        if not self._common(vcpu_id, "io", device, "out" if direction else "in"):
            return False
        return self.ports is None or any(lo <= port <= hi for lo, hi in self.ports)

    def mmio(self, vcpu_id: int, addr: int, is_write: bool, device: str | None) -> bool:
        if not self._common(vcpu_id, "mmio", device, "out" if is_write else "in"):
            return False
        return self.addrs is None or any(lo <= addr <= hi for lo, hi in self.addrs)

    def other(self, vcpu_id: int, reason: str) -> bool:
        return self.devices is None and self.directions is None \
            and self._common(vcpu_id, reason, None, None)


# --- decoding ---------------------------------------------------------------------------------
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
            try:
                import capstone
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


@dataclass
class Located:
    rip: int                    # the instruction's address (as RIP/IP sees it)
    past: bool | None           # True: RIP already points past it
    insn: Instruction | None
    note: str = ""


@dataclass
class _Site:
    """The vCPU's state at one exit, read once."""
    vcpu: object
    regs: object
    sregs: object
    bits: int
    cs_base: int

    def linear(self, rip: int) -> int:
        return rip if self.bits == 64 else (self.cs_base + rip) & 0xFFFFFFFF

    def read(self, rip: int, length: int) -> tuple[bytes, int | None]:
        """Bytes at RIP-relative address ``rip`` and their guest-physical address."""
        from ..guest.code import read_linear
        linear = self.linear(rip)
        try:
            phys = linear_to_physical(self.vcpu, self.sregs, linear)
            return read_linear(self.vcpu, self.sregs, linear, length), phys
        except (PykvmError, GuestMemoryError):
            return b"", None


class InstructionLocator:
    """Finds and decodes the instruction behind an exit (see the module docstring)."""

    def __init__(self, disassembler: Disassembler | None = None, sync_regs: bool = True):
        self.dis = disassembler or Disassembler()
        # (kind, cpl) -> [times RIP was at the instruction, times it was past it]
        self.seen: dict[tuple[str, int], list[int]] = {}
        self.sync_regs = sync_regs
        self._synced: set[int] = set()      # vCPUs whose kvm_run carries their registers
        self._sites: dict[tuple, tuple] = {}  # exit site -> (Located, its physical address, bytes)

    def site(self, vcpu) -> _Site:
        """The vCPU's registers at this exit. With KVM_CAP_SYNC_REGS, KVM copies them
        into the shared kvm_run page at every exit once asked (kvm_valid_regs), which
        saves the two ioctls that otherwise cost most of a traced exit."""
        run = vcpu.run_struct
        if vcpu.id in self._synced and run.kvm_valid_regs & _SYNC == _SYNC:
            regs, sregs = run.s.regs.regs, run.s.regs.sregs
        else:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            if self.sync_regs and vcpu.vm.kvm.check_extension(k.KVM_CAP_SYNC_REGS) & _SYNC == _SYNC:
                run.kvm_valid_regs |= _SYNC   # from the next exit on
                self._synced.add(vcpu.id)
        return _Site(vcpu, regs, sregs, cpu_bits(sregs), sregs.cs.base)

    def at_rip(self, vcpu) -> Located:
        site = self.site(vcpu)
        rip = site.regs.rip
        code, phys = site.read(rip, MAX_INSN_LEN)
        if not code:
            return Located(rip, None, None, "code not mapped")
        return Located(rip, None, self.dis.decode(code, rip, site.bits, phys, 1))

    # -- the exit-site cache ----------------------------------------------------------------
    def _cached(self, vcpu, key) -> Located | None:
        """The same exit at the same RIP as before: one byte comparison, no page walk."""
        hit = self._sites.get(key)
        if hit is None:
            return None
        located, physical, code = hit
        try:
            if vcpu.vm.memory.read(physical, len(code)) == code:
                return located
        except GuestMemoryError:
            pass
        del self._sites[key]
        return None

    def _remember(self, key, located: Located, physical: int | None) -> Located:
        if physical is not None and located.insn is not None and located.past is not None:
            if len(self._sites) > 16384:
                self._sites.clear()
            self._sites[key] = (located, physical, located.insn.code)
        return located

    # -- port I/O ---------------------------------------------------------------------------
    def pio(self, vcpu, port: int, size: int, direction: int) -> Located:
        site = self.site(vcpu)
        regs = site.regs
        key = (site.bits, site.cs_base, regs.rip, site.sregs.cr3, direction, size, port,
               regs.rdx & 0xFFFF == port)
        return self._cached(vcpu, key) or self._remember(key, *self._pio(site, port, size, direction))

    def _pio(self, site: _Site, port: int, size: int, direction: int):
        rip = site.regs.rip
        dx = site.regs.rdx & 0xFFFF

        def fits(io: IoInstruction | None) -> bool:
            return io is not None and io.direction == direction and io.size == size and \
                (io.port == port if io.port is not None else dx == port)

        code, phys = site.read(rip, MAX_INSN_LEN)
        at = decode_io(code, site.bits)
        at = at if fits(at) else None
        past = None
        start = max(rip - 5, 0) if site.bits != 64 else rip - 5
        before, before_phys = site.read(start, rip - start)
        for n in range(1, len(before) + 1):
            io = decode_io(before[-n:], site.bits)
            if fits(io) and io.length == n:
                past = n
                break
        kind = "out" if direction else "in"
        choice = self._choose(kind, site, at is not None, past is not None)
        if choice is None:
            return Located(rip, None, self.dis.decode(code, rip, site.bits, phys, 1) if code else None,
                           "instruction not found"), None
        if choice == "at":
            return Located(rip, False, self.dis.decode(code, rip, site.bits, phys, at.length)), phys
        address = rip - past
        key = before_phys + len(before) - past if before_phys is not None else None
        return Located(address, True,
                       self.dis.decode(before[-past:], address, site.bits, key, past)), key

    # -- MMIO --------------------------------------------------------------------------------
    def mmio(self, vcpu, addr: int, is_write: bool) -> Located:
        site = self.site(vcpu)
        key = (site.bits, site.cs_base, site.regs.rip, site.sregs.cr3, is_write, addr)
        return self._cached(vcpu, key) or self._remember(key, *self._mmio(site, addr, is_write))

    def _mmio(self, site: _Site, addr: int, is_write: bool):
        rip = site.regs.rip
        if not self.dis.available:
            code, _ = site.read(rip, 8)
            return Located(rip, None, Instruction(None, code.hex(" "), code) if code else None,
                           "" if not is_write else "next instruction? (no capstone to find it)"), None
        code, phys = site.read(rip, MAX_INSN_LEN)
        at = self.dis.decode(code, rip, site.bits, phys) if code else None
        at_fits = at is not None and self._touches(site, at, rip, addr)
        start = max(rip - MAX_INSN_LEN, 0) if site.bits != 64 else rip - MAX_INSN_LEN
        before, before_phys = site.read(start, rip - start)
        past = past_phys = None
        for n in range(1, len(before) + 1):
            key = before_phys + len(before) - n if before_phys is not None else None
            insn = self.dis.decode(before[-n:], rip - n, site.bits, key)
            if insn is not None and insn.length == n and self._touches(site, insn, rip - n, addr):
                past, past_phys = insn, key
                break
        choice = self._choose("write" if is_write else "read", site, at_fits, past is not None)
        if choice == "at":
            return Located(rip, False, at), phys
        if choice == "past":
            return Located(rip - past.length, True, past), past_phys
        return Located(rip, None, at, "instruction not found"), None

    def _touches(self, site: _Site, insn: Instruction, address: int, addr: int) -> bool:
        """Does one of ``insn``'s memory operands land on guest-physical ``addr``?"""
        for segment, base, index, scale, disp in insn.memory:
            ea = disp
            if base == "rip" or base == "eip":
                ea += address + insn.length
            elif base:
                value = register_value(site.regs, base)
                if value is None:
                    continue
                ea += value
            if index:
                value = register_value(site.regs, index)
                if value is None:
                    continue
                ea += value * scale
            if site.bits == 64:
                linear = ea & 0xFFFFFFFFFFFFFFFF
                if segment in ("fs", "gs"):
                    linear += getattr(site.sregs, segment).base
            else:
                ea &= 0xFFFF if site.bits == 16 else 0xFFFFFFFF
                if segment is None:
                    segment = "ss" if base in ("bp", "ebp", "sp", "esp") else "ds"
                linear = (getattr(site.sregs, segment).base + ea) & 0xFFFFFFFF
            try:
                phys = linear_to_physical(site.vcpu, site.sregs, linear & 0xFFFFFFFFFFFFFFFF)
            except PykvmError:
                continue
            if phys <= addr < phys + 16:
                return True
        return False

    def _choose(self, kind: str, site: _Site, at: bool, past: bool) -> str | None:
        cpl = site.sregs.cs.selector & 3 if site.bits != 16 else 0
        votes = self.seen.setdefault((kind, cpl), [0, 0])
        if at and past:
            if votes[0] != votes[1]:
                return "at" if votes[0] > votes[1] else "past"
            # KVM's instruction emulator moves RIP before exiting for writes
            return "past" if kind in ("out", "write") else "at"
        if at:
            votes[0] += 1
            return "at"
        if past:
            votes[1] += 1
            return "past"
        return None


# --- the tracer ---------------------------------------------------------------------------------
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
        """A tracer writing to ``path`` ('-' or None: stderr)."""
        if path in (None, "", "-"):
            return cls(sys.stderr, **options)
        try:
            stream = open(path, "w", buffering=1)
        except OSError as error:
            raise ConfigError(f"--trace {path}: cannot write it: {error.strerror}") from None
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


def now_ns() -> int:
    return time.perf_counter_ns()
