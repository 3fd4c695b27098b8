"""What KVM itself holds for a VM, as typed state (the protocol: pykvm/snapshot/state.py):
each vCPU's registers and in-kernel LAPIC (:class:`VcpuState`), and the VM's in-kernel
PIC, IOAPIC, PIT and clock (:class:`VmState`).

Saving and restoring go through the fd wrappers' own methods (``Vcpu.get_regs``,
``Vm.get_irqchip``, ...): no ioctl is issued here, and pykvm/snapshot only orchestrates
and versions. A vCPU's ioctls must run on its own thread once it runs (``vcpu.call``);
the VM's may run on any thread. ctypes structs of <linux/kvm.h> are fields as they are:
state.json keeps them field by field and every field is checked against its C type.

The restore order follows what KVM needs (QEMU and Firecracker do much the same):
CPUID first (it decides which MSRs and XSAVE features exist), general registers,
FPU/XSAVE and XCRs, special registers (EFER, CR0/CR4, the APIC base, which the
LAPIC's state depends on), MSRs (the TSC among them: guest time continues from
the snapshot; not on kvm_pvm, which runs the guest on the host's TSC and accepts and
ignores the write, so a restored guest's clock jumps by the snapshot's age:
bench/RESULTS.md, "snapshot"), the MP state, the LAPIC, the TSC deadline (KVM takes it only once the
LAPIC timer is in TSC-deadline mode), pending events, debug registers.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated

from .. import ioctl as k
from ..errors import KvmError
from ..ioctl import structs as s
from ..snapshot.schema import U32, U64, Bounds, blob
from ..snapshot.state import ComponentState, SnapshotError

logger = logging.getLogger(__name__)

IRQCHIPS = (("pic_master", k.KVM_IRQCHIP_PIC_MASTER, "pic"),
            ("pic_slave", k.KVM_IRQCHIP_PIC_SLAVE, "pic"),
            ("ioapic", k.KVM_IRQCHIP_IOAPIC, "ioapic"))
EVENTS_SET_FLAGS = k.KVM_VCPUEVENT_VALID_NMI_PENDING | k.KVM_VCPUEVENT_VALID_SIPI_VECTOR \
    | k.KVM_VCPUEVENT_VALID_SHADOW
XSAVE_SIZE = 4096
MSR_TSC_DEADLINE = 0x6E0
MAX_CPUID_ENTRIES = 256            # KVM_MAX_CPUID_ENTRIES
_MSR_INDEX = re.compile(r"0x[0-9a-f]{1,8}")


# --- one vCPU -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VcpuState(ComponentState, tag="vcpu"):
    id: Annotated[int, Bounds(0, 254)]
    cpuid: tuple[s.kvm_cpuid_entry2, ...]
    regs: s.kvm_regs
    sregs: s.kvm_sregs
    fpu: s.kvm_fpu
    xsave: blob(XSAVE_SIZE, exact=True) | None      # None without KVM_CAP_XSAVE
    xcrs: s.kvm_xcrs | None                         # None without KVM_CAP_XCRS
    msrs: dict[str, U64]                            # "0x10": value, every MSR that reads
    lapic: blob(s.KVM_APIC_REG_SIZE, exact=True)
    events: s.kvm_vcpu_events
    mp_state: U32
    debugregs: s.kvm_debugregs

    def check(self) -> None:
        if len(self.cpuid) > MAX_CPUID_ENTRIES:
            raise SnapshotError(f"vCPU {self.id}: {len(self.cpuid)} CPUID entries "
                                f"(KVM takes at most {MAX_CPUID_ENTRIES})")
        bad = next((index for index in self.msrs if not _MSR_INDEX.fullmatch(index)), None)
        if bad is not None:
            raise SnapshotError(f"vCPU {self.id}: MSR index {bad[:20]!r} is not of the form "
                                f"0x1b")

    @classmethod
    def save(cls, vcpu) -> "VcpuState":
        kvm = vcpu.kvm
        return cls(
            id=vcpu.id, cpuid=tuple(vcpu.get_cpuid()), regs=vcpu.get_regs(),
            sregs=vcpu.get_sregs(), fpu=vcpu.get_fpu(),
            xsave=bytes(vcpu.get_xsave()) if kvm.check_extension(k.KVM_CAP_XSAVE) else None,
            xcrs=vcpu.get_xcrs() if kvm.check_extension(k.KVM_CAP_XCRS) else None,
            msrs={f"{index:#x}": value for index, value in read_msrs(vcpu, kvm.msr_index_list())},
            lapic=bytes(vcpu.get_lapic()), events=vcpu.get_events(),
            mp_state=vcpu.get_mp_state(), debugregs=vcpu.get_debugregs())

    def restore(self, vcpu) -> None:
        if self.id != vcpu.id:
            raise SnapshotError(f"state.json: vCPU state {self.id} given to vCPU {vcpu.id}")
        vcpu.set_cpuid(list(self.cpuid))
        vcpu.set_regs(self.regs)
        vcpu.set_fpu(self.fpu)
        if self.xsave is not None:
            vcpu.set_xsave(s.kvm_xsave.from_buffer_copy(self.xsave))
        if self.xcrs is not None:
            vcpu.set_xcrs(self.xcrs)
        vcpu.set_sregs(self.sregs)
        msrs = {int(index, 16): value for index, value in self.msrs.items()}
        # KVM ignores a TSC deadline written while the LAPIC timer is not in TSC-deadline
        # mode (a new vCPU's is not): it goes after the LAPIC, or the guest's timer is lost
        # and the restored guest stalls the first time only the timer could wake it.
        deadline = {index: msrs.pop(index) for index in (MSR_TSC_DEADLINE,) if index in msrs}
        failed = write_msrs(vcpu, msrs)
        vcpu.set_mp_state(self.mp_state)
        vcpu.set_lapic(s.kvm_lapic_state.from_buffer_copy(self.lapic))
        failed += write_msrs(vcpu, deadline)
        if failed:
            logger.warning("restore: vCPU %d: KVM refused MSR(s) %s", vcpu.id,
                           ", ".join(f"{i:#x}" for i in failed))
        events = s.kvm_vcpu_events.from_buffer_copy(self.events)
        events.flags = EVENTS_SET_FLAGS | (events.flags & k.KVM_VCPUEVENT_VALID_SMM)
        vcpu.set_events(events)
        debugregs = s.kvm_debugregs.from_buffer_copy(self.debugregs)
        debugregs.flags = 0
        vcpu.set_debugregs(debugregs)


def read_msrs(vcpu, indices: list[int]) -> list[tuple[int, int]]:
    """Every readable MSR of ``indices``. KVM_GET_MSRS stops at the first MSR it cannot
    read: that one is skipped and the rest asked for again."""
    values, rest = [], list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values += [(index, got[index]) for index in rest if index in got]
        done = len(got)
        rest = rest[done + 1:]     # rest[done] is the one KVM refused
    return values


def write_msrs(vcpu, values: dict[int, int]) -> list[int]:
    """Set every MSR of ``values``; returns those KVM refused (each skipped, the rest set)."""
    failed, items = [], list(values.items())
    while items:
        done = vcpu.set_msrs(dict(items))
        if done < len(items):
            failed.append(items[done][0])
        items = items[done + 1:]
    return failed


# --- the VM -------------------------------------------------------------------------------
@dataclass(frozen=True)
class IrqchipState:
    pic_master: s.kvm_pic_state
    pic_slave: s.kvm_pic_state
    ioapic: s.kvm_ioapic_state


@dataclass(frozen=True)
class ClockState:
    clock: U64
    flags: U32


@dataclass(frozen=True)
class VmState(ComponentState, tag="vm"):
    irqchip: IrqchipState
    pit: s.kvm_pit_state2
    clock: ClockState

    @classmethod
    def save(cls, vm) -> "VmState":
        chips = {name: getattr(vm.get_irqchip(chip_id).chip, kind)
                 for name, chip_id, kind in IRQCHIPS}
        clock = vm.get_clock()
        return cls(IrqchipState(**chips), vm.get_pit2(), ClockState(clock.clock, clock.flags))

    def restore(self, vm) -> None:
        for name, chip_id, kind in IRQCHIPS:
            chip = s.kvm_irqchip(chip_id=chip_id)
            setattr(chip.chip, kind, getattr(self.irqchip, name))
            vm.set_irqchip(chip)
        vm.set_pit2(self.pit)
        try:
            # The clock goes on from the snapshot's value (flags 0: no realtime/TSC pairing).
            vm.set_clock(s.kvm_clock_data(clock=self.clock.clock))
        except KvmError as error:
            raise SnapshotError(f"cannot restore the VM clock: {error}") from None
