"""What an exit leads to, off the run loop's fast path: plain functions of the vCPU.

:func:`string_io` takes the port-I/O exits the loop does not finish itself (`rep
ins/outs`, ports no device owns). :func:`handle` is called for every exit but port
I/O; it returns None (enter the guest again) or the :class:`Stop` the VM is to make,
and raises GuestCrashed for a state the guest cannot go on from (the loop turns
that into a crash stop). It reaches the devices through the vCPU's MMIO bus and the
features through the VM's hook list (hooks.py), never the VM itself; the decode is
pykvm/ioctl/run.py's. The exit reasons and what KVM expects back: api.rst "struct kvm_run".
"""

from __future__ import annotations

import time

from .. import ioctl as k
from ..errors import GuestCrashed, KvmError, PykvmError
from ..guest.code import code_at_rip
from ..ioctl import run
from ..ioctl import structs as s
from .control import Stop

# ``vcpu`` below is a vcpu.Vcpu, not imported: vcpu.py imports this module (one way).

_SUBERRORS = {k.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
              k.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
              k.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed"}


def handle(vcpu, reason: int, t0: int, t1: int) -> Stop | None:
    hooks = vcpu.hooks
    outcome = None
    if reason == k.KVM_EXIT_MMIO:
        mmio(vcpu, t0, t1)
    elif reason == k.KVM_EXIT_INTERNAL_ERROR:
        error = run.internal_error(vcpu.run_struct)
        if not any(hook(vcpu, error.suberror) for hook in hooks.internal_error):
            raise GuestCrashed(internal_error_message(vcpu, error))
    elif reason == k.KVM_EXIT_HLT:
        # Only without an in-kernel irqchip: the guest has nothing left to do.
        outcome = Stop("halt", 0, f"vCPU {vcpu.id} halted")
    elif reason == k.KVM_EXIT_SHUTDOWN:
        outcome = Stop.for_error(GuestCrashed(
            f"guest triple fault on vCPU {vcpu.id} (it reset itself after an unhandled "
            f"exception):\n{describe_registers(vcpu)}"))
    elif reason == k.KVM_EXIT_FAIL_ENTRY:
        fail = run.fail_entry(vcpu.run_struct)
        raise GuestCrashed(
            f"KVM could not enter the guest on vCPU {vcpu.id} (hardware entry failure "
            f"reason {fail.reason:#x}): the vCPU state is invalid\n{describe_registers(vcpu)}")
    elif reason == k.KVM_EXIT_SYSTEM_EVENT:
        kind = run.system_event(vcpu.run_struct).kind
        if kind == k.KVM_SYSTEM_EVENT_RESET:
            outcome = Stop("reset", 0, "guest requested a reset")
        elif kind == k.KVM_SYSTEM_EVENT_CRASH:
            outcome = Stop.for_error(GuestCrashed(f"guest reported a crash on vCPU {vcpu.id}"))
        else:
            outcome = Stop("poweroff", 0, "guest powered off")
    elif reason == k.KVM_EXIT_DEBUG:
        if not any(hook(vcpu) for hook in hooks.debug_exit):
            debug = run.debug_exit(vcpu.run_struct)
            raise GuestCrashed(f"unexpected debug exit on vCPU {vcpu.id}: exception "
                               f"{debug.exception} at {debug.pc:#x}")
    elif reason == k.KVM_EXIT_IRQ_WINDOW_OPEN or reason == k.KVM_EXIT_INTR:
        pass
    else:
        raise GuestCrashed(f"unhandled KVM exit {k.EXIT_NAMES.get(reason, reason)} on vCPU "
                           f"{vcpu.id}\n{describe_registers(vcpu)}")
    if reason != k.KVM_EXIT_MMIO:
        for hook in hooks.exit:
            hook(vcpu, t0, t1, time.perf_counter_ns(), reason)
    return outcome


def mmio(vcpu, t0: int, t1: int) -> None:
    """An access no memory slot backs: to the device mapped there, or reads as all ones."""
    buf = vcpu.run_buffer
    access = run.mmio_exit(buf)
    mapping = vcpu.mmio_bus.find(access.addr)
    stats = vcpu.stats
    stats.mmio[(access.addr, "write" if access.is_write else "read")] += 1
    mask = (1 << 8 * access.length) - 1
    if mapping is None:
        stats.unhandled_mmio += 1
        value = access.value if access.is_write else mask
    else:
        device = mapping.device
        if access.is_write:
            value = access.value
            device.write(access.addr - mapping.base, access.length, value)
        else:
            value = device.read(access.addr - mapping.base, access.length) & mask
        stats.devices[device.name] += 1
    if not access.is_write:
        run.complete_mmio_read(buf, access, value)
    for hook in vcpu.hooks.mmio:
        hook(vcpu, t0, t1, time.perf_counter_ns(), access.addr, access.length,
             access.is_write, value, mapping.device.name if mapping else None)


def internal_error_message(vcpu, error: run.InternalError) -> str:
    suberror = _SUBERRORS.get(error.suberror, f"suberror {error.suberror}")
    try:
        rip, code = code_at_rip(vcpu)
        detail = f" at rip {rip:#x}, instruction bytes {code.hex(' ')}"
    except PykvmError as failure:
        detail = f" ({failure})"
    return f"KVM internal error on vCPU {vcpu.id}: {suberror}{detail}\n{describe_registers(vcpu)}"


def string_io(vcpu, direction: int, size: int, port: int, count: int, data_offset: int,
              entry) -> int:
    """The port-I/O exits off the loop's fast path: `rep ins/outs` (count > 1) and
    accesses to ports no device owns (reads see all ones). ``entry`` is the PIO bus's
    (device, offset) or None; returns the last value moved, for the hooks."""
    buf = vcpu.run_buffer
    mask = (1 << (8 * size)) - 1
    value = mask
    for i in range(count):
        at = data_offset + i * size
        if entry is None:
            if direction:
                value = int.from_bytes(buf[at:at + size], "little")
            else:
                buf[at:at + size] = mask.to_bytes(size, "little")
            continue
        device, offset = entry
        if direction:
            value = int.from_bytes(buf[at:at + size], "little")
            device.write(offset, size, value)
        else:
            value = device.read(offset, size) & mask
            buf[at:at + size] = value.to_bytes(size, "little")
    if entry is None:
        vcpu.stats.unhandled_pio += count
    else:
        vcpu.stats.devices[entry[0].name] += count
    return value


def describe_registers(vcpu) -> str:
    """A register dump for crash messages."""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except KvmError as error:
        return f"(registers unavailable: {error})"
    gprs = " ".join(f"{name}={getattr(regs, name):#x}" for name, _ in s.kvm_regs._fields_)
    return (f"{gprs}\ncs={sregs.cs.selector:#x} ss={sregs.ss.selector:#x} "
            f"cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
            f"efer={sregs.efer:#x} idt={sregs.idt.base:#x}/{sregs.idt.limit:#x} "
            f"gdt={sregs.gdt.base:#x}/{sregs.gdt.limit:#x}")
