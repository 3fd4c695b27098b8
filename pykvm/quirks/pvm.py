"""kvm_pvm: KVM for nested use without VT-x/AMD-V (see ../shared/HOST.md).

Guest ring-0 code is emulated instruction by instruction there, and the
emulator stops (KVM_EXIT_INTERNAL_ERROR, suberror 1, RIP at the instruction)
at instructions it does not know. pykvm completes those itself, the way QEMU
once completed what KVM could not, and keeps the guest away from the ones it
cannot complete (CPUID bits, kernel command-line options).
"""

from __future__ import annotations

from ..errors import PykvmError
from ..ioctl import requests as r
from . import Quirks

RFLAGS_AC = 1 << 18
CPUID_1_ECX_CX16 = 1 << 13
VECTOR_BP = 3

# Kernel command-line options that keep Linux away from what this host cannot run.
LINUX_CMDLINE = ("nopv noxsave "
                 "clearcpuid=smap,popcnt,movbe,rdrand,avx,avx2,fsgsbase,bmi1,bmi2,adx,rdseed "
                 "lpj=1000000 tsc=reliable no_timer_check")


class PvmQuirks(Quirks):
    name = "kvm_pvm"
    summary = [
        "guest ring-0 code is emulated by the host (~1000x slower than VT-x); ring 3 runs natively",
        "int3/int n, clac/stac and fwait in ring 0 are completed by pykvm",
        "CPUID.1:ECX.CX16 is cleared (the emulator cannot run lock cmpxchg16b)",
        f"Linux gets: {LINUX_CMDLINE}",
    ]

    def adjust_cpuid(self, entries):
        for entry in entries:
            if entry.function == 1:
                entry.ecx &= ~CPUID_1_ECX_CX16
        return entries

    def adjust_cmdline(self, cmdline: str) -> str:
        return f"{cmdline} {LINUX_CMDLINE}".strip()

    def complete_internal_error(self, vcpu, suberror: int) -> bool:
        if suberror != r.KVM_INTERNAL_ERROR_EMULATION:
            return False
        regs = vcpu.get_regs()
        try:
            _, code = self.instruction_at_rip(vcpu)
        except PykvmError:
            return False
        return self.complete_instruction(vcpu, regs, code)

    def complete_instruction(self, vcpu, regs, code: bytes) -> bool:
        """Finish one instruction the host's emulator refused. True if done."""
        kind = None
        if code[:1] == b"\xcc":                       # int3
            kind, length, vector = "int3", 1, VECTOR_BP
        elif code[:1] == b"\xcd" and len(code) >= 2:  # int imm8
            kind, length, vector = "int n", 2, code[1]
        if kind is not None:
            regs.rip += length
            vcpu.set_regs(regs)
            vcpu.inject_exception(vector)
        elif code[:3] in (b"\x0f\x01\xca", b"\x0f\x01\xcb"):  # clac / stac
            kind = "clac/stac"
            if code[2] == 0xCA:
                regs.rflags &= ~RFLAGS_AC
            else:
                regs.rflags |= RFLAGS_AC
            regs.rip += 3
            vcpu.set_regs(regs)
        elif code[:1] == b"\x9b":                     # fwait: nothing to wait for
            kind = "fwait"
            regs.rip += 1
            vcpu.set_regs(regs)
        else:
            return False
        vcpu.stats.quirks[kind] += 1
        return True
