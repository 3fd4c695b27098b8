"""System calls from guest ring 3 on kvm_pvm, completed through the guest's #PF entry.

On kvm_pvm a `syscall` in guest user mode does everything SYSCALL should
(RCX = return address, R11 = RFLAGS, RFLAGS masked by SFMASK, RIP = LSTAR)
except the switch to ring 0: CS and SS keep the user selectors, so fetching
the first instruction at LSTAR faults, and the guest kernel sees a user-mode
instruction-fetch page fault at its own syscall entry (Linux then kills init).
See docs/hosts.md, "System calls".

pykvm therefore plants an `int3` over the first byte of the guest's #PF handler
(IDT vector 14). Ring-0 code is emulated on this host and the emulator stops at
`int3`, so every page fault now reaches pykvm once, with the exception frame
[error, RIP, CS, RFLAGS, RSP, SS] on the guest stack:

- frame RIP == LSTAR (or CSTAR, SYSCALL's target in 32-bit user code) and
  frame CS at ring 3: the system call that did not switch rings. pykvm finishes it: RSP and RFLAGS from the frame, CS/SS the
  ring-0 segments STAR names, RIP = LSTAR (CSTAR). The frame is dropped (SYSCALL does
  not push one) and the kernel's syscall entry runs as on real hardware.
- anything else is a genuine page fault: pykvm performs the instruction its
  `int3` covers (a NOP, endbr64 or `clac`) and resumes after it, the frame
  untouched, so the guest's handler runs as if nothing had happened.

The plant waits until vector 14 points at a handler that starts with one of
those instructions (Linux's early boot handler, `early_idt_handler_array`,
starts with a push, and is replaced later). It is re-checked on every
emulation-failure exit and every CHECK_INTERVAL seconds from a watch thread,
because the IDT may move and the kernel rewrites its own text (measured: the
handler's `90 90 90` later became `90 66 90`, wiping the first byte).
One plant serves all vCPUs (Linux shares its IDT); the completion itself is
per vCPU, on that vCPU's thread.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, replace

from ..boot.modes import gdt_entry, segment_from_descriptor
from ..errors import GuestCrashed, GuestMemoryError, PykvmError
from ..guest.idt import INTERRUPT_GATE, TRAP_GATE, read_gate
from ..guest.pagewalk import LEVEL4, LEVEL5, paging_mode, read_linear, translate
from ..ioctl.structs import kvm_sregs
from .. import sandbox
from ..ioctl.run import SYNCED_SREGS_OFFSET
from ..snapshot.schema import U64, blob
from ..snapshot.state import ComponentState, SnapshotError
from ..vstate.hooks import ExitWatch

logger = logging.getLogger(__name__)

VECTOR_PF = 14
INT3 = 0xCC
CHECK_INTERVAL = 0.5   # seconds between two checks of the plant by the watch thread
MAX_PLANTS = 16        # handlers remembered at once (a guest may keep one IDT per CPU)

MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082   # SYSCALL's target from 64-bit user code
MSR_CSTAR = 0xC0000083   # ... from 32-bit (compatibility-mode) user code, on AMD
MSR_SFMASK = 0xC0000084

RFLAGS_FIXED = 1 << 1
RFLAGS_RF = 1 << 16
RFLAGS_AC = 1 << 18
PF_ERROR_WRITE = 1 << 1
PF_ERROR_USER = 1 << 2

# What a plant depends on among the special registers: IDTR (where vector 14 is), CR0, CR3,
# CR4 and EFER (the paging mode and tables the gate and handler are read through), read
# straight from the copy KVM stores in kvm_run at each exit (kvm_sregs from idt at offset
# 208 to efer at 264; CR2 and CR8 are skipped: CR2 changes at every page fault).
PLANT_KEY = struct.Struct("<QH6xQ8xQQ8xQ")
PLANT_KEY_OFFSET = SYNCED_SREGS_OFFSET + kvm_sregs.idt.offset
# Port-I/O exits after a change of those registers at which the plant is still looked for:
# a guest may write its IDT's gates (or its handler) just after its lidt.
EARLY_WINDOW = 256

# What the CPU pushes for an exception with an error code in long mode.
EXCEPTION_FRAME = struct.Struct("<6Q")   # error, RIP, CS, RFLAGS, RSP, SS

# The segments SYSCALL loads (fixed by the architecture, not read from the GDT):
# flat ring-0 64-bit code (type 0xB, L, G) and flat ring-0 data (type 3, B, G).
SYSCALL_CS = gdt_entry(0, 0xFFFFF, 0x9B, 0xA)
SYSCALL_SS = gdt_entry(0, 0xFFFFF, 0x93, 0xC)

ENDBR64 = b"\xf3\x0f\x1e\xfa"
CLAC = b"\x0f\x01\xca"
NOP_PREFIXES = (0x66, 0x2E)   # the prefixes of the multi-byte NOPs compilers emit


@dataclass(frozen=True)
class Plant(ComponentState, tag="pf-hook-plant"):
    """An int3 of pykvm's over the first byte of a guest #PF handler. A snapshot's
    memory holds the int3 bytes; without these, a restored guest's next page fault
    would look like its own breakpoint."""

    handler: U64        # linear address (the RIP a vCPU stops at)
    physical: U64       # where the int3 byte lives
    displaced: blob(15)  # the whole instruction whose first byte the int3 covers
    kind: str           # "nop" or "clac": what pykvm does in its place

    def check(self) -> None:
        if self.kind not in ("nop", "clac") or not 1 <= len(self.displaced) <= 15:
            raise SnapshotError(f"not a page-fault hook pykvm could have planted: "
                                f"{self.kind[:10]!r} over {len(self.displaced)} bytes")


class SyscallCompletion:
    """The #PF-entry hook of one VM: the plants (shared) and the completion (per vCPU)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._plants: dict[int, Plant] = {}   # by handler linear address
        self._watch: threading.Thread | None = None

    @property
    def plants(self) -> list[Plant]:
        return list(self._plants.values())

    # --- the plant ---------------------------------------------------------------------
    def check(self, vcpu, sregs) -> None:
        """Make sure the #PF handler of the vCPU's current IDT starts with our int3."""
        if paging_mode(sregs) not in (LEVEL4, LEVEL5):
            return  # SYSCALL from 64-bit user mode needs long mode
        memory = vcpu.memory
        gate = read_gate(memory, sregs, VECTOR_PF)
        if gate is None or not gate.present or gate.type not in (INTERRUPT_GATE, TRAP_GATE):
            return
        physical = translate(memory, sregs, gate.handler)
        if physical is None:
            return
        with self._lock:
            plant = self._plants.get(gate.handler)
            if plant is not None and plant.physical == physical \
                    and _byte_at(memory, physical) == INT3:
                return  # in place: the common case
            code = read_linear(memory, sregs, gate.handler, 16)
            if code is None:
                return
            if code[0] == INT3:
                # Already ours under another linear address (the same handler mapped twice)
                # or the guest's own (text patching in progress): adopt or wait.
                same = next((p for p in self._plants.values() if p.physical == physical), None)
                if same is not None:
                    self._remember(memory, replace(same, handler=gate.handler))
                return
            found = first_instruction(code)
            if found is None:
                return  # not (yet) a final handler, e.g. Linux's early_idt_handler_array
            length, kind = found
            memory.write_u8(physical, INT3)
            self._remember(memory, Plant(gate.handler, physical, code[:length], kind))
        vcpu.stats.quirks["page-fault hook planted"] += 1

    def _remember(self, memory, plant: Plant) -> None:
        """Record a plant (it replaces any earlier one at the same handler) and forget
        those whose int3 the guest has overwritten since. Call with the lock held."""
        plants = {handler: p for handler, p in self._plants.items()
                  if handler != plant.handler and _byte_at(memory, p.physical) == INT3}
        plants[plant.handler] = plant
        while len(plants) > MAX_PLANTS:
            del plants[next(iter(plants))]
        self._plants = plants   # published whole: complete() reads it without the lock

    def unplant(self, memory) -> None:
        """Give the guest its own bytes back (before a snapshot meant for another host)."""
        with self._lock:
            for plant in self._plants.values():
                if _byte_at(memory, plant.physical) == INT3:
                    memory.write_u8(plant.physical, plant.displaced[0])
            self._plants = {}

    # --- snapshots -----------------------------------------------------------------------
    def save_state(self) -> tuple[Plant, ...]:
        """The plants: where each int3 is and the instruction it displaced."""
        with self._lock:
            return tuple(self._plants.values())

    def restore_state(self, plants: tuple[Plant, ...]) -> None:
        with self._lock:
            self._plants = {plant.handler: plant for plant in plants}

    # --- the completion ----------------------------------------------------------------
    def complete(self, vcpu, regs, sregs) -> bool:
        """Finish an emulation-failure exit at a planted handler; False if it is not one.
        Raises GuestCrashed when the exception frame cannot be read."""
        plant = self._plants.get(regs.rip)
        if plant is None or paging_mode(sregs) not in (LEVEL4, LEVEL5):
            return False
        memory = vcpu.memory
        frame = read_linear(memory, sregs, regs.rsp, EXCEPTION_FRAME.size)
        if frame is None:
            raise GuestCrashed(
                f"vCPU {vcpu.id} entered the guest's page-fault handler at {regs.rip:#x}, but "
                f"its exception frame at rsp {regs.rsp:#x} is not in mapped guest memory")
        error, rip, cs, rflags, rsp, _ss = EXCEPTION_FRAME.unpack(frame)
        msrs = vcpu.get_msrs([MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK])
        targets = {msrs.get(MSR_LSTAR, 0), msrs.get(MSR_CSTAR, 0)} - {0}
        if rip in targets and cs & 3 == 3 \
                and error & PF_ERROR_USER and not error & PF_ERROR_WRITE:
            enter_syscall(vcpu, regs, sregs, msrs, rflags, rsp, rip)
            vcpu.stats.quirks["syscall"] += 1
            return True
        with self._lock:
            plant = self._plants.get(regs.rip)
            if plant is None or _byte_at(memory, plant.physical) != INT3:
                # The guest rewrote the handler meanwhile: its own instruction is there now.
                return False
            if plant.kind == "clac":
                regs.rflags &= ~RFLAGS_AC
            regs.rip += len(plant.displaced)
        vcpu.set_regs(regs)
        vcpu.stats.quirks["page fault passed through"] += 1
        return True

    # --- the watch ---------------------------------------------------------------------
    def watch(self, vm) -> None:
        """Re-check the plant from vCPU 0's thread every CHECK_INTERVAL while ``vm`` runs
        (one watch thread per VM; it ends when the VM stops)."""
        with self._lock:
            if self._watch is not None:
                return
            self._watch = threading.Thread(target=self._watch_loop, args=(vm,),
                                           name="pvm-pf-hook", daemon=True)
        self._watch.start()

    def _watch_loop(self, vm) -> None:
        while not vm.wait_stopped(CHECK_INTERVAL):
            vcpu = vm.vcpus[0] if vm.vcpus else None
            if vcpu is None or vcpu.thread is None or not vcpu.thread.is_alive():
                continue
            try:
                vcpu.call(lambda v: self.check(v, v.get_sregs()), timeout=4 * CHECK_INTERVAL)
            except (PykvmError, TimeoutError):
                pass  # the vCPU is busy or stopping; the next round will do
            except Exception:  # a bug here must not go unseen, nor stop the guest
                logger.exception("the #PF hook's watcher stopped")
                return


class EarlyPlant:
    """Until the #PF hook is planted, look for the handler at port-I/O exits too.

    A guest may make its first system call microseconds after loading its IDT, with no
    emulation stop between (a few `out`s to print, then `iretq` and `syscall`: tutorial
    04, tests/guests/syscall.S), long before the watch thread's next round. Looking at
    every exit through KVM_GET_SREGS doubled the cost of each exit of any guest that never
    plants the hook (flat guests, bench/exits.py). Instead KVM stores the special
    registers into kvm_run at each exit (KVM_SYNC_X86_SREGS) while this watch is armed,
    and an exit costs one unpack and a compare of IDTR, CR0, CR3, CR4 and EFER against
    what the vCPU showed last, in the run loop itself (a Vcpu.exit_watch); the full check
    (gate, page walk, handler bytes) runs only after they change, and for EARLY_WINDOW
    exits after that. Once the hook is planted
    the watch disarms itself: the hot path is back to what it was without it.

    (A cheaper trigger, the guest's `wrmsr` to LSTAR through a KVM_X86_SET_MSR_FILTER
    exit, does not work on kvm_pvm: the filtered write raises #GP in the guest instead
    of exiting to user space, even with KVM_MSR_EXIT_REASON_FILTER enabled.)
    """

    def __init__(self, completion: SyscallCompletion):
        self.completion = completion
        self._vcpus: list = []

    def arm(self, vm) -> None:
        self._vcpus = list(vm.vcpus)
        for vcpu in self._vcpus:
            vcpu.sync_sregs(True)
            vcpu.exit_watch = ExitWatch(PLANT_KEY, PLANT_KEY_OFFSET, self._observer(vcpu))

    def disarm(self) -> None:
        for vcpu in self._vcpus:
            vcpu.exit_watch = None
            vcpu.sync_sregs(False)

    def _observer(self, vcpu):
        """``vcpu``'s ExitWatch callback: the run loop calls it when PLANT_KEY changed (or
        when it returned None: the window after a change)."""
        last, window = None, 0

        def changed(key: tuple) -> tuple | None:
            nonlocal last, window
            if key != last:
                last, window = key, EARLY_WINDOW
            else:
                window -= 1
            self.completion.check(vcpu, vcpu.synced_sregs())
            if self.completion.plants:
                self.disarm()
                return key
            return None if window else key
        return changed


def enter_syscall(vcpu, regs, sregs, msrs: dict[int, int], rflags: int, rsp: int,
                  target: int) -> None:
    """Do the ring switch SYSCALL did not: the state it would have left, at ``target``.
    RCX and R11 already hold what SYSCALL stored; the exception frame is dropped."""
    selector = (msrs.get(MSR_STAR, 0) >> 32) & 0xFFFF
    segment_from_descriptor(sregs.cs, selector & 0xFFFC, SYSCALL_CS)
    segment_from_descriptor(sregs.ss, (selector + 8) & 0xFFFF, SYSCALL_SS)
    regs.rsp = rsp
    # SFMASK is applied again: a user jump to LSTAR (no SYSCALL at all) must not enter the
    # kernel with the interrupt or trap flag the kernel asked SYSCALL to clear.
    regs.rflags = (rflags & ~msrs.get(MSR_SFMASK, 0) & ~RFLAGS_RF) | RFLAGS_FIXED
    regs.rip = target
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)


def first_instruction(code: bytes) -> tuple[int, str] | None:
    """(length, kind) of the first instruction of a #PF handler pykvm may displace, or None.

    A NOP of any length, `clac`, or `endbr64` followed by one of those (Linux built with
    IBT; endbr64 alone also starts Linux's early handler, which must not be taken).
    pykvm performs a NOP or endbr64 as nothing (this host offers no CET to guests).
    """
    if code.startswith(ENDBR64):
        return (len(ENDBR64), "nop") if _nop_or_clac(code[len(ENDBR64):]) else None
    if code.startswith(CLAC):
        return len(CLAC), "clac"
    length = nop_length(code)
    return None if length is None else (length, "nop")


def _nop_or_clac(code: bytes) -> bool:
    return code.startswith(CLAC) or nop_length(code) is not None


def nop_length(code: bytes) -> int | None:
    """Length of the NOP at the start of ``code``: 90, 66 90, 0f 1f /0 (with the prefixes
    compilers put on multi-byte NOPs); decode.py reads its ModRM, SIB and displacement.

    Only planting the hook asks (never before a guest's first KVM_RUN), so the decoder is
    imported here, after the sandbox's background preload (bench/startup.py): the caller
    may be a confined vCPU thread, which cannot import on its own."""
    sandbox.wait_for_preload()
    from .decode import decode
    instruction = decode(code)
    if instruction is None or instruction.rex or set(instruction.prefixes) - set(NOP_PREFIXES):
        return None
    if instruction.opcode == b"\x90" or (instruction.opcode == b"\x0f\x1f"
                                          and instruction.reg == 0):
        return instruction.length
    return None


def _byte_at(memory, physical: int) -> int | None:
    try:
        return memory.read_u8(physical)
    except GuestMemoryError:
        return None
