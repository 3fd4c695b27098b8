"""kvm_pvm: KVM for nested use without VT-x/AMD-V (see docs/hosts.md).

Guest ring-0 code is emulated instruction by instruction there, and the
emulator stops (KVM_EXIT_INTERNAL_ERROR, suberror 1, RIP at the instruction)
at instructions it does not know. pykvm completes those itself, the way QEMU
once completed what KVM could not, and keeps the guest away from the ones it
cannot complete (CPUID bits, kernel command-line options).
"""

from __future__ import annotations

from ..errors import GuestCrashed, PykvmError
from ..guest.code import code_at_rip, linear_rip
from ..ioctl import requests as r
from .. import sandbox
from ..snapshot.state import SnapshotError
from . import Quirks, QuirksState
from .cmdline import DEBIAN_CLOCK_SLOWDOWN, DEBIAN_WORDS, is_debian, merge
from .syscall import EarlyPlant, SyscallCompletion

CPUID_1_ECX_CX16 = 1 << 13

# Kernel command-line options that keep Linux away from what this host cannot run.
# Measured in ring 0 on kvm_pvm (long mode): the emulator stops at popcnt, andn (bmi1),
# shrx/mulx/pdep/rorx (bmi2), adcx (adx), AVX (vmovdqu, vzeroupper), SSE and x87
# arithmetic, xsave/xsaveopt/ldmxcsr, xgetbv, rdtscp, verw, lsl and clwb; movbe and rdpid
# raise #UD (not offered); rdrand, rdseed, lzcnt/tzcnt, fxsave/fxrstor, fninit,
# wrfsbase, swapgs and cmpxchg8b run. pykvm completes ldmxcsr, stmxcsr and xgetbv
# (complete.py) and keeps Linux off the others: clearcpuid and noxsave below, RDTSCP
# is not offered to guests, Linux uses verw only on CPUs with MDS (not AMD, what this
# host reports), and lsl/rdpid only in its FSGSBASE paranoid entry (fsgsbase cleared).
# ssse3: Debian's kernels build the SSSE3 BLAKE2s in (CONFIG_CRYPTO_BLAKE2S_X86=y), which
# random.c runs on every CPU between kernel_fpu_begin (the ldmxcsr Debian's cloud kernel
# stopped at) and kernel_fpu_end; its pshufb/paddd stop the emulator, and without SSSE3
# Linux takes the generic C BLAKE2s (arch/x86/crypto/blake2s-glue.c).
# sse4_2, pclmulqdq, aes, sha_ni: the modules a distribution's initramfs loads check
# these before they use their SSE forms, and the emulator stops at those forms: Debian's
# initramfs-tools loaded crc32c_intel for ext4 and the boot stopped at its `crc32q`
# (f2 4c 0f 38 f1) while mounting the root; crc32-pclmul, ghash-clmulni, aesni-intel and
# sha*-ni are the same kind. Without them Linux takes its generic C code.
# A Linux 6.1 boot to a shell command then stops at nothing but int3, fwait and
# pykvm's own #PF hook.
LINUX_CMDLINE = ("nopv noxsave "
                 "clearcpuid=smap,popcnt,movbe,rdrand,avx,avx2,fsgsbase,bmi1,bmi2,adx,rdseed,"
                 "ssse3,sse4_2,pclmulqdq,aes,sha_ni "
                 "lpj=1000000 tsc=reliable no_timer_check")


class PvmQuirks(Quirks):
    name = "kvm_pvm"
    summary = [
        "guest ring-0 code is emulated by the host (~1000x slower than VT-x); ring 3 runs natively",
        "int3/int n, clac/stac, fwait, ldmxcsr/stmxcsr and xgetbv in ring 0 are completed "
        "by pykvm; another instruction the emulator refuses stops the VM",
        "system calls from guest ring 3 are completed by pykvm through the guest's "
        "page-fault entry (an int3 planted there; every guest page fault exits once)",
        "CPUID.1:ECX.CX16 is cleared (the emulator cannot run lock cmpxchg16b)",
        f"Linux gets: {LINUX_CMDLINE}",
        "Debian's kernels also get (a word of --append with the same key replaces "
        f"pykvm's): {' '.join(DEBIAN_WORDS)}",
        f"Debian's kernels keep a clock {DEBIAN_CLOCK_SLOWDOWN} times slower than real time "
        "(fewer timer ticks per second; --clock-slowdown 1 for real time)",
    ]

    def __init__(self):
        self.syscalls = SyscallCompletion()
        # Per vCPU, the (RIP, bytes) of the last instruction refused that no completion
        # holds: see complete_instruction for why it gets one retry.
        self._refused: dict[int, tuple[int, bytes]] = {}

    def on_start(self, vm) -> None:
        self.syscalls.watch(vm)
        if not self.syscalls.plants:
            # A guest may reach its first system call microseconds after loading its IDT,
            # before any emulator stop or watch round: until the hook is planted, look
            # at port-I/O exits too (guests print before they enter user mode).
            EarlyPlant(self.syscalls).arm(vm)

    def save_state(self) -> QuirksState:
        # The int3 bytes are in guest memory; what they displaced is only here.
        return QuirksState(self.name, self.syscalls.save_state())

    def restore_state(self, state: QuirksState) -> None:
        if state.name != self.name:
            raise SnapshotError(f"quirks of {state.name[:20]} given to {self.name}")
        self.syscalls.restore_state(state.plants)

    def adjust_cpuid(self, entries):
        for entry in entries:
            if entry.function == 1:
                entry.ecx &= ~CPUID_1_ECX_CX16
        return entries

    def adjust_cmdline(self, cmdline: str, kernel_version: str | None = None) -> str:
        cmdline = f"{cmdline} {LINUX_CMDLINE}".strip()
        if is_debian(kernel_version):
            cmdline = merge(cmdline, DEBIAN_WORDS)   # a word of the user's wins (cmdline.py)
        return cmdline

    def clock_slowdown(self, kernel_version: str | None = None) -> int:
        return DEBIAN_CLOCK_SLOWDOWN if is_debian(kernel_version) else 1

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
            return False   # RIP itself is unreadable: the VMM's generic report says so
        return self.complete_instruction(vcpu, regs, sregs, code)

    def complete_instruction(self, vcpu, regs, sregs, code: bytes) -> bool:
        """Finish one instruction the host's emulator refused, by complete.py's table;
        one it does not hold stops the VM (GuestCrashed) with a line naming it."""
        # The decoder and the table load in the background, off the path to the first
        # KVM_RUN (bench/startup.py); a confined vCPU thread waits for them the first time.
        sandbox.wait_for_preload()
        from .complete import Step, code_bits, complete, describe_unknown, find
        from .decode import decode
        bits = code_bits(sregs)
        instruction = decode(code, bits)
        completion = None if instruction is None else find(instruction)
        rip = linear_rip(regs, sregs)
        if completion is None:
            # Cross-modifying code: Linux patches its text under a running SMP guest with
            # an int3 at the first byte (text_poke_bp, arch/x86/kernel/alternative.c).
            # Another vCPU that fetched that int3 stops the emulator, and by the time
            # pykvm reads RIP's bytes the patch may be finished: a NOP or a jump the
            # emulator runs. So an instruction no row holds is retried once; the same
            # RIP and bytes refused again are the guest's own and stop the VM.
            seen = (rip, code[:instruction.length if instruction else len(code)])
            if self._refused.get(vcpu.id) != seen:
                self._refused[vcpu.id] = seen
                vcpu.stats.quirks["retried: code changed under the emulator"] += 1
                return True
            raise GuestCrashed(describe_unknown(vcpu.id, rip, code, bits, instruction,
                                                self.symbols))
        self._refused.pop(vcpu.id, None)
        vcpu.stats.quirks[complete(Step(vcpu, regs, sregs, rip, instruction, bits),
                                   completion)] += 1
        return True
