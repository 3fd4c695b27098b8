"""gdb's breakpoints in the guest: ``int3`` bytes and the debug registers.

GDB manual, "Packets" (Appendix E.4), ``Z0``/``z0``: a software breakpoint is an
``int3`` (0xCC) written into guest memory, the original byte kept and shown by
``m`` (gdb must never see its own int3s). ``Z1``/``z1``: a hardware breakpoint,
one of DR0-3 enabled in DR7 (Intel SDM vol. 3, 18.2 "Debug Registers": Li set,
RWi = LENi = 0 for an instruction fetch), handed to KVM with KVM_SET_GUEST_DEBUG
(KVM_GUESTDBG_USE_HW_BP; Documentation/virt/kvm/api.rst 4.52).

Why a Z0 also takes a free debug register when there is one: in real mode KVM's
emulator runs ``int3`` through the guest's IVT without exiting, and on kvm_pvm guest
ring-0 ``int3`` ends in an emulation failure; the debug register still reports the
hit. An explicit Z1 takes such a backup register back when all four are used.
Watchpoints (Z2-Z4) are not offered: gdb falls back to single-stepping.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ioctl as k

INT3 = 0xCC
DR7_RESERVED = 1 << 10
SLOTS = 4                 # DR0-3


@dataclass
class SoftBreakpoint:
    address: int        # as gdb gave it
    linear: int
    physical: int
    original: int       # the byte int3 replaced
    slot: int | None    # a debug register backing it up, if one was free


@dataclass(frozen=True)
class Slot:
    """A debug register in use: the linear address, and whose it is ("Z0" or "Z1")."""

    linear: int
    owner: str


class Breakpoints:
    """Every breakpoint gdb set, over ``memory`` (guest-physical, pykvm.memory)."""

    def __init__(self, memory):
        self.memory = memory
        self.soft: dict[int, SoftBreakpoint] = {}            # by guest-physical address
        self.slots: list[Slot | None] = [None] * SLOTS

    def insert_soft(self, address: int, linear: int, physical: int) -> None:
        if physical in self.soft:
            return
        original = self.memory.read_u8(physical)
        self.soft[physical] = SoftBreakpoint(address, linear, physical, original,
                                             self._take_slot(linear, "Z0"))
        self.memory.write_u8(physical, INT3)

    def remove_soft(self, linear: int, physical: int) -> None:
        bp = self.soft.pop(physical, None)
        if bp is None:
            return
        self.memory.write_u8(physical, bp.original)
        if bp.slot is not None and self.slots[bp.slot] == Slot(linear, "Z0"):
            self.slots[bp.slot] = None

    def insert_hard(self, linear: int) -> bool:
        """False when all four debug registers hold hardware breakpoints already."""
        return self._take_slot(linear, "Z1", evict=True) is not None

    def remove_hard(self, linear: int) -> None:
        for i, slot in enumerate(self.slots):
            if slot == Slot(linear, "Z1"):
                self.slots[i] = None
                return

    def _take_slot(self, linear: int, owner: str, evict: bool = False) -> int | None:
        for i, slot in enumerate(self.slots):
            if slot is None:
                self.slots[i] = Slot(linear, owner)
                return i
        if evict:  # a Z0's backup register gives way to an explicit hardware breakpoint
            for i, slot in enumerate(self.slots):
                if slot.owner == "Z0":
                    for bp in self.soft.values():
                        if bp.slot == i:
                            bp.slot = None
                    self.slots[i] = Slot(linear, owner)
                    return i
        return None

    def hit(self, dr6: int) -> str | None:
        """The stop-reply kind ("hwbreak"/"swbreak") of a #DB whose DR6 names one of
        our debug registers (B0-B3), or None: not ours."""
        for i in range(SLOTS):
            slot = self.slots[i]
            if dr6 >> i & 1 and slot is not None:
                return "hwbreak" if slot.owner == "Z1" else "swbreak"
        return None

    def at_linear(self, linear: int) -> bool:
        return any(bp.linear == linear for bp in self.soft.values())

    def original(self, physical: int) -> int | None:
        """The guest's own byte under one of our int3s, or None: no int3 of ours there."""
        bp = self.soft.get(physical)
        return None if bp is None else bp.original

    def guest_debug(self, stepping: bool) -> tuple[int, list[int]]:
        """KVM_SET_GUEST_DEBUG's control flags and debugreg[8] for one vCPU."""
        control = 0
        debugreg = [0] * 8
        if self.soft:
            control |= k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_USE_SW_BP
        if any(self.slots):
            control |= k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_USE_HW_BP
            debugreg[7] = DR7_RESERVED
            for i, slot in enumerate(self.slots):
                if slot is not None:
                    debugreg[i] = slot.linear
                    debugreg[7] |= 1 << (2 * i)      # Li: enabled; RWi = LENi = 0: execute
        if stepping:
            control |= k.KVM_GUESTDBG_ENABLE | k.KVM_GUESTDBG_SINGLESTEP
        return control, debugreg

    def clear(self) -> None:
        """Take every int3 out of guest memory and free the debug registers (detach)."""
        for bp in self.soft.values():
            self.memory.write_u8(bp.physical, bp.original)
        self.soft.clear()
        self.slots = [None] * SLOTS
