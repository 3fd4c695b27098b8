"""The stub's side of the run loop: exit hooks on the vCPU threads that turn gdb's
breakpoints and single steps into stop events.

Registered in the VM's exit-hook list (pykvm/vstate/hooks.py) by ``GdbStub.attach``
only, so a VM without gdb pays nothing on its exits. :class:`BreakpointHook` goes
first (an int3 of gdb's is not the guest's, and must not reach the host's quirks);
:class:`StepWatch` after any tracer.

What reports what (KVM: Documentation/virt/kvm/api.rst 4.52, KVM_SET_GUEST_DEBUG):
single steps and hardware breakpoints arrive as KVM_EXIT_DEBUG with #DB (DR6 says
which, Intel SDM vol. 3, 18.2.3), software breakpoints as KVM_EXIT_DEBUG with #BP
on VT-x/AMD-V, but as an emulation-failure exit on kvm_pvm in guest ring 0. A #DB
or #BP that is none of gdb's is injected back: it is the guest's own.

Each stop pauses the VM (the other vCPUs too: gdb's all-stop mode, GDB manual
"All-Stop Mode") and queues a :class:`StopEvent` for the stub's thread, which
answers gdb with a ``T`` stop reply ("Stop Reply Packets", E.3).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass

from .. import ioctl as k
from ..errors import PykvmError
from ..guest.code import linear_to_physical
from ..observe.disasm import cpu_bits
from .breakpoints import INT3, Breakpoints

SIGINT, SIGTRAP = 2, 5
DR6_BS = 1 << 14          # single step


@dataclass
class StopEvent:
    vcpu_id: int
    signal: int
    kind: str = ""      # "swbreak", "hwbreak", "" (step, interrupt)

    def reply(self) -> str:
        """The ``T`` stop reply; gdb's thread ids are vCPU numbers + 1."""
        extra = f"{self.kind}:;" if self.kind else ""
        return f"T{self.signal:02x}thread:{self.vcpu_id + 1:x};{extra}"


class Traps:
    """What the vCPU threads and the stub's thread share: breakpoints, which vCPUs
    step, and the queue of stops."""

    def __init__(self, vm, breakpoints: Breakpoints):
        self.vm = vm
        self.breakpoints = breakpoints
        self.stepping: set[int] = set()
        self.step_ended: set[int] = set()
        self.events: queue.Queue[StopEvent] = queue.Queue()

    def on_debug_exit(self, vcpu) -> bool:
        arch = vcpu.run_struct.debug.arch
        if arch.exception == 1:
            if vcpu.id in self.step_ended and arch.dr6 & DR6_BS:
                return True   # the trap of a step already reported at its port/MMIO exit
            if vcpu.id in self.stepping:
                self.stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP))
                return True
            kind = self.breakpoints.hit(arch.dr6)
            if kind is not None:
                self.stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP, kind))
                return True
            vcpu.inject_exception(1)   # the guest's own #DB
            return True
        if arch.exception == 3:
            if self.breakpoints.at_linear(arch.pc):
                self.stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP, "swbreak"))
                return True
            vcpu.inject_exception(3)   # the guest's own int3: let it have its #BP
            return True
        return False

    def on_internal_error(self, vcpu) -> bool:
        """kvm_pvm: guest ring-0 int3 ends in an emulation failure, RIP at the int3."""
        if not self.breakpoints.soft or \
                vcpu.run_struct.internal.suberror != k.KVM_INTERNAL_ERROR_EMULATION:
            return False
        try:
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            linear = regs.rip if cpu_bits(sregs) == 64 else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
            physical = linear_to_physical(vcpu, sregs, linear)
        except PykvmError:
            return False
        if self.breakpoints.original(physical) is None or self.vm.memory.read_u8(physical) != INT3:
            return False
        self.stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP, "swbreak"))
        return True

    def step_exit(self, vcpu) -> None:
        """A port-I/O or MMIO exit of a stepping vCPU. KVM loses the single-step
        trap of an instruction that exits to user space (its run loop says so:
        "we might be squashing a KVM_GUESTDBG_SINGLESTEP-triggered KVM_EXIT_DEBUG"),
        so the step ends here. The kick makes the next KVM_RUN finish the
        instruction (an `in` still needs its value) and return before running on."""
        if vcpu.id in self.stepping:
            self.step_ended.add(vcpu.id)
            self.stop_here(vcpu, StopEvent(vcpu.id, SIGTRAP))

    def stop_here(self, vcpu, event: StopEvent) -> None:
        """On the vCPU thread: pause the VM, and this vCPU at its next KVM_RUN."""
        self.stepping.discard(vcpu.id)
        self.vm.pause()
        vcpu.kick()
        self.events.put(event)


class BreakpointHook:
    """The exit handlers (first in the VM's hook list): gdb's own int3 (kvm_pvm reports
    it as an emulation failure) and debug exits (single steps, hardware breakpoints)."""

    def __init__(self, traps: Traps):
        self.traps = traps

    def internal_error(self, vcpu, suberror: int) -> bool:
        return self.traps.on_internal_error(vcpu)

    def debug_exit(self, vcpu) -> bool:
        return self.traps.on_debug_exit(vcpu)


class StepWatch:
    """An exit hook that ends single steps at port-I/O and MMIO exits (KVM reports no
    debug exit for an instruction it left to user space)."""

    def __init__(self, traps: Traps):
        self.traps = traps

    def pio(self, vcpu, *args) -> None:
        if self.traps.stepping:
            self.traps.step_exit(vcpu)

    def mmio(self, vcpu, *args) -> None:
        if self.traps.stepping:
            self.traps.step_exit(vcpu)
