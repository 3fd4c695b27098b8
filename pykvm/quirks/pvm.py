"""kvm_pvm: KVM for nested use without VT-x/AMD-V (see ../shared/HOST.md).

Guest ring-0 code is emulated instruction by instruction there, and the
emulator stops (KVM_EXIT_INTERNAL_ERROR, suberror 1, RIP at the instruction)
at instructions it does not know. pykvm completes those itself, the way QEMU
once completed what KVM could not, and keeps the guest away from the ones it
cannot complete (CPUID bits, kernel command-line options).
"""

from __future__ import annotations

from ..errors import PykvmError
from ..guest.code import code_at_rip
from ..ioctl import requests as r
from . import Quirks
from .syscall import SyscallCompletion

RFLAGS_AC = 1 << 18
CPUID_1_ECX_CX16 = 1 << 13
VECTOR_BP = 3

# Kernel command-line options that keep Linux away from what this host cannot run.
# Measured in ring 0 on kvm_pvm (long mode): the emulator stops at popcnt, andn (bmi1),
# shrx/mulx/pdep/rorx (bmi2), adcx (adx), AVX (vmovdqu, vzeroupper), SSE and x87
# arithmetic, xsave/xsaveopt/ldmxcsr, xgetbv, rdtscp, verw, lsl and clwb; movbe and rdpid
# raise #UD (not offered); rdrand, rdseed, lzcnt/tzcnt, fxsave/fxrstor, fninit,
# wrfsbase, swapgs and cmpxchg8b run. pykvm completes none of the stopping ones but
# keeps Linux off them: clearcpuid and noxsave below, RDTSCP is not offered to guests,
# Linux uses verw only on CPUs with MDS (not AMD, what this host reports), and lsl/rdpid
# only in its FSGSBASE paranoid entry (fsgsbase cleared). A Linux 6.1 boot to a shell
# command then stops at nothing but int3, fwait and pykvm's own #PF hook.
LINUX_CMDLINE = ("nopv noxsave "
                 "clearcpuid=smap,popcnt,movbe,rdrand,avx,avx2,fsgsbase,bmi1,bmi2,adx,rdseed "
                 "lpj=1000000 tsc=reliable no_timer_check")


class PvmQuirks(Quirks):
    name = "kvm_pvm"
    summary = [
        "guest ring-0 code is emulated by the host (~1000x slower than VT-x); ring 3 runs natively",
        "int3/int n, clac/stac and fwait in ring 0 are completed by pykvm",
        "system calls from guest ring 3 are completed by pykvm through the guest's "
        "page-fault entry (an int3 planted there; every guest page fault exits once)",
        "CPUID.1:ECX.CX16 is cleared (the emulator cannot run lock cmpxchg16b)",
        f"Linux gets: {LINUX_CMDLINE}",
    ]

    def __init__(self):
        self.syscalls = SyscallCompletion()

    def on_start(self, vm) -> None:
        self.syscalls.watch(vm)
        if not self.syscalls.plants:
            # A guest may reach its first system call a few ms after loading its IDT,
            # before any emulator stop or watch round: until the hook is planted, look
            # at each port-I/O exit too (guests print before they enter user mode).
            vm.pio_observer = self._plant_early

    def _plant_early(self, vcpu) -> None:
        self.syscalls.check(vcpu, vcpu.get_sregs())
        if self.syscalls.plants:
            vcpu.vm.pio_observer = None

    def save_state(self) -> dict:
        # The int3 bytes are in guest memory; what they displaced is only here.
        return {**super().save_state(), "syscalls": self.syscalls.save_state()}

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        self.syscalls.restore_state(state["syscalls"])

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
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        # Ours first: the int3 planted at the #PF handler is not the guest's breakpoint.
        self.syscalls.check(vcpu, sregs)
        if self.syscalls.complete(vcpu, regs, sregs):
            return True
        try:
            _, code = code_at_rip(vcpu, regs, sregs)
        except PykvmError:
            return False
        return self.complete_instruction(vcpu, regs, code)

    def complete_instruction(self, vcpu, regs, code: bytes) -> bool:
        """Finish one instruction the host's emulator refused. True if done."""
        if code[:1] == b"\xcc":                       # int3: the #BP trap, after the int3
            kind = "int3"
            regs.rip += 1
            vcpu.set_regs(regs)
            vcpu.inject_exception(VECTOR_BP)
        elif code[:1] == b"\xcd" and len(code) >= 2:  # int imm8
            kind = "int n"
            regs.rip += 2
            vcpu.set_regs(regs)
            inject_software_interrupt(vcpu, code[1])
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
