"""What KVM itself holds for a VM: each vCPU's registers and in-kernel LAPIC, and
the VM's in-kernel PIC, IOAPIC, PIT and clock.

:meth:`pykvm.vstate.vcpu.Vcpu.save_state` and :meth:`pykvm.vstate.vm.Vm.save_state` call these.
A vCPU's ioctls must run on its own thread once it runs (``vcpu.call``); the VM's
may run on any thread.

The restore order follows what KVM needs (QEMU and Firecracker do much the same):
CPUID first (it decides which MSRs and XSAVE features exist), general registers,
FPU/XSAVE and XCRs, special registers (EFER, CR0/CR4, the APIC base, which the
LAPIC's state depends on), MSRs (the TSC among them: guest time continues from
the snapshot), the MP state, the LAPIC, the TSC deadline (KVM takes it only once the
LAPIC timer is in TSC-deadline mode), pending events, debug registers.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Annotated

from .. import ioctl as k
from ..errors import KvmError
from ..ioctl import structs as s
from .schema import U32, U64, Bounds, Record, base64_text
from .state import SnapshotError, b64, struct_from_json, struct_to_json, unb64

IRQCHIPS = (("pic_master", k.KVM_IRQCHIP_PIC_MASTER, "pic"),
            ("pic_slave", k.KVM_IRQCHIP_PIC_SLAVE, "pic"),
            ("ioapic", k.KVM_IRQCHIP_IOAPIC, "ioapic"))
EVENTS_SET_FLAGS = k.KVM_VCPUEVENT_VALID_NMI_PENDING | k.KVM_VCPUEVENT_VALID_SIPI_VECTOR \
    | k.KVM_VCPUEVENT_VALID_SHADOW
XSAVE_SIZE = 4096
MSR_TSC_DEADLINE = 0x6E0
MAX_CPUID_ENTRIES = 256            # KVM_MAX_CPUID_ENTRIES
_MSR_INDEX = re.compile(r"0x[0-9a-f]{1,8}")


# --- the schema (pykvm/snapshot/schema.py): what state.json may hold for them ----------------
# ctypes structs stay objects of their fields here; struct_from_json checks each field
# against its C type (presence, type, range) when the struct is built.
@dataclass(frozen=True)
class VcpuState(Record):
    id: Annotated[int, Bounds(0, 254)]
    cpuid: tuple[dict, ...]
    regs: dict
    sregs: dict
    fpu: dict
    xsave: base64_text(XSAVE_SIZE) | None
    xcrs: dict | None
    msrs: dict[str, U64]
    lapic: base64_text(s.KVM_APIC_REG_SIZE)
    events: dict
    mp_state: U32
    debugregs: dict

    def __post_init__(self):
        if len(self.cpuid) > MAX_CPUID_ENTRIES:
            raise SnapshotError(f"state.json: vCPU {self.id}: {len(self.cpuid)} CPUID entries "
                                f"(KVM takes at most {MAX_CPUID_ENTRIES})")
        bad = next((index for index in self.msrs if not _MSR_INDEX.fullmatch(index)), None)
        if bad is not None:
            raise SnapshotError(f"state.json: vCPU {self.id}: MSR index {bad[:20]!r} is not "
                                f"of the form 0x1b")


@dataclass(frozen=True)
class IrqchipState:
    pic_master: dict
    pic_slave: dict
    ioapic: dict


@dataclass(frozen=True)
class ClockState:
    clock: U64
    flags: U32


@dataclass(frozen=True)
class VmState(Record):
    irqchip: IrqchipState
    pit: dict
    clock: ClockState


# --- one vCPU -------------------------------------------------------------------------------
def save_vcpu(vcpu) -> dict:
    kvm = vcpu.kvm
    state = {
        "id": vcpu.id,
        "cpuid": [struct_to_json(entry) for entry in vcpu.get_cpuid()],
        "regs": struct_to_json(vcpu.get_regs()),
        "sregs": struct_to_json(vcpu.get_sregs()),
        "fpu": struct_to_json(vcpu.get_fpu()),
        "xsave": None,
        "xcrs": None,
        "msrs": {f"{index:#x}": value for index, value in read_msrs(vcpu, kvm.msr_index_list())},
        "lapic": b64(bytes(vcpu.get_lapic())),
        "events": struct_to_json(vcpu.get_events()),
        "mp_state": vcpu.get_mp_state(),
        "debugregs": struct_to_json(vcpu.get_debugregs()),
    }
    if kvm.check_extension(k.KVM_CAP_XSAVE):
        xsave = s.kvm_xsave()
        k.ioctl(vcpu.fd, k.KVM_GET_XSAVE, xsave)
        state["xsave"] = b64(bytes(xsave))
    if kvm.check_extension(k.KVM_CAP_XCRS):
        state["xcrs"] = struct_to_json(vcpu.get_xcrs())
    return state


def restore_vcpu(vcpu, state: VcpuState | dict, log=sys.stderr) -> None:
    state = VcpuState.from_json(state, f"vcpus[{vcpu.id}]")
    if state.id != vcpu.id:
        raise SnapshotError(f"state.json: vCPU state {state.id} given to vCPU {vcpu.id}")
    vcpu.set_cpuid([struct_from_json(s.kvm_cpuid_entry2, entry) for entry in state.cpuid])
    vcpu.set_regs(struct_from_json(s.kvm_regs, state.regs))
    vcpu.set_fpu(struct_from_json(s.kvm_fpu, state.fpu))
    if state.xsave is not None:
        xsave = s.kvm_xsave.from_buffer_copy(unb64(state.xsave, XSAVE_SIZE))
        k.ioctl(vcpu.fd, k.KVM_SET_XSAVE, xsave)
    if state.xcrs is not None:
        vcpu.set_xcrs(struct_from_json(s.kvm_xcrs, state.xcrs))
    vcpu.set_sregs(struct_from_json(s.kvm_sregs, state.sregs))
    msrs = {int(index, 16): value for index, value in state.msrs.items()}
    # KVM ignores a TSC deadline written while the LAPIC timer is not in TSC-deadline
    # mode (a new vCPU's is not): it goes after the LAPIC, or the guest's timer is lost
    # and the restored guest stalls the first time only the timer could wake it.
    deadline = {index: msrs.pop(index) for index in (MSR_TSC_DEADLINE,) if index in msrs}
    failed = write_msrs(vcpu, msrs)
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_lapic(s.kvm_lapic_state.from_buffer_copy(unb64(state.lapic, s.KVM_APIC_REG_SIZE)))
    failed += write_msrs(vcpu, deadline)
    if failed:
        print(f"pykvm: restore: vCPU {vcpu.id}: KVM refused MSR(s) "
              f"{', '.join(f'{i:#x}' for i in failed)}", file=log)
    events = struct_from_json(s.kvm_vcpu_events, state.events)
    events.flags = EVENTS_SET_FLAGS | (events.flags & k.KVM_VCPUEVENT_VALID_SMM)
    vcpu.set_events(events)
    debugregs = struct_from_json(s.kvm_debugregs, state.debugregs)
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
def save_vm(vm) -> dict:
    chips = {}
    for name, chip_id, kind in IRQCHIPS:
        chip = s.kvm_irqchip(chip_id=chip_id)
        k.ioctl(vm.fd, k.KVM_GET_IRQCHIP, chip)
        chips[name] = struct_to_json(getattr(chip.chip, kind))
    pit = s.kvm_pit_state2()
    k.ioctl(vm.fd, k.KVM_GET_PIT2, pit)
    clock = s.kvm_clock_data()
    k.ioctl(vm.fd, k.KVM_GET_CLOCK, clock)
    return {"irqchip": chips, "pit": struct_to_json(pit),
            "clock": {"clock": clock.clock, "flags": clock.flags}}


def restore_vm(vm, state: VmState | dict) -> None:
    state = VmState.from_json(state, "vm")
    for name, chip_id, kind in IRQCHIPS:
        chip = s.kvm_irqchip(chip_id=chip_id)
        struct_type = s.kvm_pic_state if kind == "pic" else s.kvm_ioapic_state
        setattr(chip.chip, kind, struct_from_json(struct_type, getattr(state.irqchip, name)))
        k.ioctl(vm.fd, k.KVM_SET_IRQCHIP, chip)
    k.ioctl(vm.fd, k.KVM_SET_PIT2, struct_from_json(s.kvm_pit_state2, state.pit))
    try:
        # The clock goes on from the snapshot's value (flags 0: no realtime/TSC pairing).
        k.ioctl(vm.fd, k.KVM_SET_CLOCK, s.kvm_clock_data(clock=state.clock.clock))
    except KvmError as error:
        raise SnapshotError(f"cannot restore the VM clock: {error}") from None
