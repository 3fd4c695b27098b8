"""Finding the guest instruction behind an exit that reached pykvm.

Called on the vCPU thread after pykvm handled the exit and before the next
KVM_RUN, so it may read the vCPU's registers (KVM_GET_REGS, KVM_GET_SREGS, or
the kvm_run page with KVM_CAP_SYNC_REGS) and walk the guest's own page tables.

Where RIP points at an exit (measured; see tests/kvm/test_trace.py). KVM finishes
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

So the locator looks at RIP first and, when the instruction there cannot have
caused this exit, at the instruction that *ends* at RIP; when both could have
(``out dx, al`` twice in a row), it goes with what it saw this host do for that
kind of exit before. The line says which it was: ``rip:at`` or ``rip:past``.

Decoded instructions are cached by guest-physical address (checked against the
bytes on each use, so self-modifying code is still shown right), and each exit
site (mode, CS base, RIP, CR3, access) remembers where its instruction was: a
repeated exit costs one byte comparison, no page walk.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ioctl as k
from ..errors import GuestMemoryError, PykvmError
from ..guest.code import MAX_INSN_LEN, linear_to_physical, read_linear
from .disasm import Disassembler, Instruction, IoInstruction, cpu_bits, decode_io, register_value

_SYNC = k.KVM_SYNC_X86_REGS | k.KVM_SYNC_X86_SREGS


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
            if self.sync_regs and vcpu.kvm.check_extension(k.KVM_CAP_SYNC_REGS) & _SYNC == _SYNC:
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
            if vcpu.memory.read(physical, len(code)) == code:
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
