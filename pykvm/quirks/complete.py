"""Instructions pykvm completes for a guest when kvm_pvm's emulator refuses them.

On kvm_pvm, guest ring-0 code is emulated by the host, and the emulator stops
(KVM_EXIT_INTERNAL_ERROR, suberror 1 "emulation", RIP at the instruction) at
instructions it does not know. pykvm then plays the CPU for that one
instruction: it decodes it (decode.py), looks it up in COMPLETIONS below, and
either performs it (registers, MXCSR, memory through the guest's page tables)
and moves RIP past it, or raises in the guest the exception the CPU would have
raised (#UD, #NM, #GP, #PF; SDM vol. 2 lists them per instruction under
"Protected Mode Exceptions" / "64-Bit Mode Exceptions"). An instruction that is
not in the table stops the VM (pvm.py says which and where).

Each row was measured: on this kind of host a flat ring-0 guest executing it
ends KVM_RUN with the emulation failure (tests/kvm/test_completions.py runs each one
and checks its architectural result). Instructions the emulator does run
(fxsave, fxrstor, xsetbv, wbinvd, clflush, rdtsc, ...) need no row; the ones it
stops at that Linux can be kept away from by CPUID or its command line are kept
away (pvm.py's LINUX_CMDLINE) rather than completed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from ..errors import GuestCrashed, GuestMemoryError
from ..guest.access import PageFault, locate
from ..guest.pagewalk import CR4_LA57, is_canonical
from .. import ioctl as k
from ..ioctl import structs as s
from ..observe.disasm import Disassembler   # imported here: a vCPU thread, once confined, cannot import
from .decode import OPERAND_SIZE, REP, REPNE, Instruction, default_segment, effective_address

# Exception vectors (SDM vol. 3A table 6-1).
VECTOR_BP, VECTOR_UD, VECTOR_NM, VECTOR_SS, VECTOR_GP, VECTOR_PF = 3, 6, 7, 12, 13, 14

CR0_MP, CR0_EM, CR0_TS = 1 << 1, 1 << 2, 1 << 3
CR4_OSFXSR, CR4_OSXSAVE = 1 << 9, 1 << 18
EFER_LMA = 1 << 10
RFLAGS_AC = 1 << 18
MXCSR_MASK_DEFAULT = 0xFFBF    # SDM vol. 1 11.6.6: when FXSAVE stores a zero MXCSR_MASK
# The XSAVE area (SDM vol. 1 13.4): MXCSR at bytes 24..27, MXCSR_MASK 28..31, XSTATE_BV at 512.
XSAVE_MXCSR_DWORD, XSAVE_MXCSR_MASK_DWORD, XSAVE_XSTATE_BV_DWORD = 6, 7, 128
XFEATURE_SSE = 1 << 1


class GuestFault(Exception):
    """The instruction raises an exception in the guest instead of completing."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(vector)
        self.vector, self.error_code, self.cr2 = vector, error_code, cr2


@dataclass
class Step:
    """One instruction being completed: the vCPU's state as KVM left it, and its decoding."""

    vcpu: object
    regs: s.kvm_regs
    sregs: s.kvm_sregs
    linear_rip: int
    instruction: Instruction
    bits: int

    @property
    def cpl(self) -> int:
        return self.sregs.cs.selector & 3

    def advance(self, *, last: bool = True) -> None:
        """Retire the instruction: RIP (and any register the completion changed) goes back.
        ``last``: nothing else changes before the guest runs again, so KVM may load them at
        the next KVM_RUN (Vcpu.set_regs(at_next_run=True): one ioctl fewer, ~10 us of the
        ~90 of a completion on kvm_pvm, bench/completions.py); an exception injected after
        needs them set at once (KVM's loading of them would drop it)."""
        self.regs.rip += self.instruction.length
        if self.bits != 64:
            self.regs.rip &= 0xFFFFFFFF
        self.vcpu.set_regs(self.regs, at_next_run=last)

    def operand_linear(self) -> int:
        """The memory operand's linear address; #GP/#SS for a non-canonical one (SDM vol. 3A
        3.3.7.1)."""
        memory = self.instruction.memory
        offset = effective_address(self.instruction, memory, self.regs, self.regs.rip)
        segment = default_segment(memory)
        if self.bits == 64:
            base = getattr(self.sregs, segment).base if segment in ("fs", "gs") else 0
            linear = (base + offset) & ((1 << 64) - 1)
            if not is_canonical(linear, 57 if self.sregs.cr4 & CR4_LA57 else 48):
                raise GuestFault(VECTOR_SS if segment == "ss" else VECTOR_GP, 0)
            return linear
        return (getattr(self.sregs, segment).base + offset) & 0xFFFFFFFF

    def _locate(self, length: int, write: bool):
        linear = self.operand_linear()
        where = locate(self.vcpu.memory, self.sregs, linear, length, write=write,
                       cpl=self.cpl, rflags=self.regs.rflags)
        if isinstance(where, PageFault):
            raise GuestFault(VECTOR_PF, where.error_code, where.address)
        return linear, where

    def read(self, length: int) -> bytes:
        linear, where = self._locate(length, write=False)
        try:
            return where.read(self.vcpu.memory)
        except GuestMemoryError:
            raise self._not_ram("reads", linear) from None

    def write(self, data: bytes) -> None:
        linear, where = self._locate(len(data), write=True)
        try:
            where.write(self.vcpu.memory, data)
        except GuestMemoryError:
            raise self._not_ram("writes", linear) from None

    def _not_ram(self, verb: str, linear: int) -> GuestCrashed:
        """An operand on MMIO or outside guest memory: nothing pykvm can complete."""
        return GuestCrashed(f"vCPU {self.vcpu.id}: the instruction at {self.linear_rip:#x} "
                            f"{verb} {linear:#x}, which is not guest RAM")


@dataclass(frozen=True)
class Completion:
    """One row: which encodings it matches, its --stats name, what it does."""

    name: str
    opcode: bytes
    run: Callable[[Step], None]
    modrm: int | None = None     # an exact ModRM byte (0f 01 ca is clac)
    reg: int | None = None       # ModRM.reg, the /digit of a group opcode
    memory_form: bool = False    # only the ModRM memory form (mod != 3)

    def matches(self, instruction: Instruction) -> bool:
        if instruction.opcode != self.opcode:
            return False
        if self.opcode[0] == 0x0F and set(instruction.prefixes) & {OPERAND_SIZE, REP, REPNE}:
            return False   # a mandatory prefix makes it another instruction (66 0f ae /6: clwb)
        if self.modrm is not None and instruction.modrm != self.modrm:
            return False
        if self.reg is not None and instruction.reg != self.reg:
            return False
        return not self.memory_form or instruction.memory is not None


# --- the completions ---------------------------------------------------------------------
def _int3(step: Step) -> None:
    """INT3: a trap, so the #BP frame's RIP is the next instruction."""
    step.advance(last=False)
    step.vcpu.inject_exception(VECTOR_BP)


def _int_n(step: Step) -> None:
    step.advance(last=False)
    inject_software_interrupt(step.vcpu, step.instruction.immediate)


def _set_ac(value: bool) -> Callable[[Step], None]:
    def run(step: Step) -> None:
        """CLAC/STAC (SDM vol. 2): #UD above CPL 0."""
        if step.cpl:
            raise GuestFault(VECTOR_UD)
        step.regs.rflags = step.regs.rflags | RFLAGS_AC if value else step.regs.rflags & ~RFLAGS_AC
        step.advance()
    return run


def _fwait(step: Step) -> None:
    """FWAIT: no x87 exception is ever pending here (the emulator runs no x87 arithmetic)."""
    step.advance()


def _sse_state_checks(step: Step) -> None:
    """LDMXCSR/STMXCSR: #UD without OSFXSR or with CR0.EM, #NM with CR0.TS (SDM vol. 2)."""
    if step.sregs.cr0 & CR0_EM or not step.sregs.cr4 & CR4_OSFXSR:
        raise GuestFault(VECTOR_UD)
    if step.sregs.cr0 & CR0_TS:
        raise GuestFault(VECTOR_NM)


# One KVM_GET_XSAVE buffer per vCPU thread, kept: ctypes zeroes a new one's 4 KiB, 2 us
# of every ldmxcsr/stmxcsr (bench/completions.py). A completion uses it until it is done.
_buffers = threading.local()


def _xsave(vcpu) -> s.kvm_xsave:
    xsave = getattr(_buffers, "xsave", None)
    if xsave is None:
        xsave = _buffers.xsave = s.kvm_xsave()
    k.ioctl(vcpu.fd, k.KVM_GET_XSAVE, xsave)
    return xsave


def mxcsr(vcpu) -> int:
    return _xsave(vcpu).region[XSAVE_MXCSR_DWORD]


def mxcsr_mask(xsave: s.kvm_xsave) -> int:
    return xsave.region[XSAVE_MXCSR_MASK_DWORD] or MXCSR_MASK_DEFAULT


def _ldmxcsr(step: Step) -> None:
    """LDMXCSR m32: #GP(0) for a bit outside MXCSR_MASK, checked after the load (SDM vol. 2).
    MXCSR goes through KVM_SET_XSAVE: KVM_GET/SET_FPU leave MXCSR out (it reads as 0),
    and KVM loads the legacy area's MXCSR only when XSTATE_BV has SSE set."""
    _sse_state_checks(step)
    value = int.from_bytes(step.read(4), "little")
    xsave = _xsave(step.vcpu)
    if value & ~mxcsr_mask(xsave):
        raise GuestFault(VECTOR_GP, 0)
    xsave.region[XSAVE_MXCSR_DWORD] = value
    xsave.region[XSAVE_XSTATE_BV_DWORD] |= XFEATURE_SSE
    k.ioctl(step.vcpu.fd, k.KVM_SET_XSAVE, xsave)
    step.advance()


def _stmxcsr(step: Step) -> None:
    _sse_state_checks(step)
    step.write(mxcsr(step.vcpu).to_bytes(4, "little"))
    step.advance()


def _xgetbv(step: Step) -> None:
    """XGETBV: EDX:EAX = XCR[ECX]; #UD without CR4.OSXSAVE, #GP(0) for an XCR other than
    XCR0 (pykvm does not offer XGETBV with ECX=1)."""
    if not step.sregs.cr4 & CR4_OSXSAVE:
        raise GuestFault(VECTOR_UD)
    if step.regs.rcx & 0xFFFFFFFF != 0:
        raise GuestFault(VECTOR_GP, 0)
    xcrs = step.vcpu.get_xcrs()
    xcr0 = next((x.value for x in xcrs.xcrs[:xcrs.nr_xcrs] if x.xcr == 0), 1)
    step.regs.rax, step.regs.rdx = xcr0 & 0xFFFFFFFF, xcr0 >> 32
    step.advance()


COMPLETIONS = (
    Completion("int3", b"\xcc", _int3),
    Completion("int n", b"\xcd", _int_n),
    Completion("clac/stac", b"\x0f\x01", _set_ac(False), modrm=0xCA),
    Completion("clac/stac", b"\x0f\x01", _set_ac(True), modrm=0xCB),
    Completion("fwait", b"\x9b", _fwait),
    Completion("ldmxcsr", b"\x0f\xae", _ldmxcsr, reg=2, memory_form=True),
    Completion("stmxcsr", b"\x0f\xae", _stmxcsr, reg=3, memory_form=True),
    Completion("xgetbv", b"\x0f\x01", _xgetbv, modrm=0xD0),
)


def find(instruction: Instruction) -> Completion | None:
    return next((c for c in COMPLETIONS if c.matches(instruction)), None)


def complete(step: Step, completion: Completion) -> str:
    """Run ``completion``; the name --stats counts it under: the row's name, or
    "ldmxcsr: #PF" when the instruction raised an exception in the guest instead."""
    try:
        if step.instruction.lock:
            raise GuestFault(VECTOR_UD)     # none of these takes a LOCK prefix
        completion.run(step)
        return completion.name
    except GuestFault as fault:
        inject_fault(step, fault)
        return f"{completion.name}: {EXCEPTION_NAMES[fault.vector]}"


EXCEPTION_NAMES = {VECTOR_UD: "#UD", VECTOR_NM: "#NM", VECTOR_SS: "#SS", VECTOR_GP: "#GP",
                   VECTOR_PF: "#PF"}


def inject_fault(step: Step, fault: GuestFault) -> None:
    """A fault: RIP stays at the instruction; a #PF also sets CR2 (SDM vol. 3A 6.15)."""
    if fault.cr2 is not None:
        step.sregs.cr2 = fault.cr2
        step.vcpu.set_sregs(step.sregs)
    step.vcpu.inject_exception(fault.vector, fault.error_code)


def inject_software_interrupt(vcpu, vector: int) -> None:
    """Deliver `int n` through the IDT, with RIP already past the instruction.
    KVM_SET_VCPU_EVENTS refuses exception vectors above 31, and a software interrupt
    pushes no error code whatever its vector, so it goes in as a soft interrupt."""
    events = vcpu.get_events()
    events.interrupt.injected = 1
    events.interrupt.nr = vector
    events.interrupt.soft = 1
    events.flags = 0
    vcpu.set_events(events)


def code_bits(sregs) -> int:
    """64 in 64-bit mode, else 32 or 16 by CS.D (SDM vol. 3A 5.2.1)."""
    if sregs.efer & EFER_LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16


def describe_unknown(vcpu_id: int, rip: int, code: bytes, bits: int,
                     instruction: Instruction | None, symbols) -> str:
    """One line for an instruction the emulator refused and no row completes: where (and
    its symbol, from ``symbols``: a symbols.SymbolTable or None), its bytes and disassembly
    (capstone when installed), and where the docs say what to do about it."""
    length = instruction.length if instruction is not None else None
    text = None
    disassembled = Disassembler().decode(code, rip, bits)
    if disassembled is not None and disassembled.length is not None:
        text = disassembled.text
        length = length or disassembled.length
    raw = code[:length] if length else code
    where = f"{rip:#x}"
    symbol = symbols.format(rip) if symbols is not None else ""
    if symbol:
        where += f" ({symbol})"
    what = f"`{text}` ({raw.hex(' ')})" if text else f"bytes {raw.hex(' ')}"
    return (f"vCPU {vcpu_id}: the host's instruction emulator (kvm_pvm) cannot run {what} "
            f"at {where}, and pykvm does not complete it; see docs/hosts.md")
