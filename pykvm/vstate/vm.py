"""One VM: memory slots, the in-kernel irqchip and PIT, eventfds, the PIO and
MMIO buses, its vCPUs, and its life cycle (created -> running <-> paused ->
stopped).

The VM owns its vCPUs and talks to them through what it gave them: the stop/pause
channel (control.py), the hook list features register in (hooks.py) and Vcpu.call;
it never calls a vCPU's privates. Features attach through ``vm.hooks``, not by
setting attributes on the VM."""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import signal
import threading
import time

from .. import ioctl as k
from .. import layout
from ..bus import IrqLine, MmioBus, PioBus
from ..errors import KvmError, PykvmError
from ..ioctl import structs as s
from ..kvm import Kvm
from ..memory import GuestMemory
from .control import RunControl, Stop
from .cpuid import vcpu_cpuid
from .hooks import ExitHooks
from .vcpu import KICK_SIGNAL, RFLAGS_IF, Vcpu

logger = logging.getLogger(__name__)

IDLE_CHECK_INTERVAL = 1.0  # seconds without an exit before pykvm looks whether a vCPU is dead-halted


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class KvmIrqLine(IrqLine):
    """A GSI of the in-kernel irqchip, driven with KVM_IRQ_LINE."""

    def __init__(self, vm_fd: int, gsi: int):
        self._fd = vm_fd
        self._levels = (s.kvm_irq_level(irq=gsi, level=0), s.kvm_irq_level(irq=gsi, level=1))
        self.gsi = gsi

    def set_level(self, high: bool) -> None:
        k.ioctl(self._fd, k.KVM_IRQ_LINE, self._levels[1 if high else 0])


_kick_handler_installed = False


def install_kick_handler() -> None:
    """A no-op handler for the kick signal: its only job is to make KVM_RUN return EINTR.
    Must run on the main thread (Python's rule); elsewhere kicks fall back to immediate_exit."""
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
        _kick_handler_installed = True


class Vm:
    def __init__(self, kvm: Kvm, memory: GuestMemory, *, quirks=None, tracer=None,
                 timing: bool = True):
        from ..quirks import for_host

        self.kvm = kvm
        self.memory = memory
        self.quirks = quirks if quirks is not None else for_host(kvm.host_kind)
        # What the vCPUs call besides devices (hooks.py): the host's quirks complete
        # internal errors; a tracer, gdb and others register here too.
        self.hooks = ExitHooks()
        self.hooks.add(self.quirks)
        if tracer is not None:
            self.hooks.add(tracer)
        self.hooks.timing = timing
        self.control = RunControl()
        self.pio_bus = PioBus()
        self.mmio_bus = MmioBus()
        self.vcpus: list[Vcpu] = []
        self.state = State.CREATED
        self._eventfds: list[int] = []
        self._closers: list = []
        self.fd = kvm.create_vm_fd()
        try:
            self._create_platform()
        except BaseException:
            os.close(self.fd)
            raise
        install_kick_handler()

    @property
    def timing(self) -> bool:
        """Per-exit timing (the guest/pykvm time split): two clock reads per exit;
        --stats wants it, a plain run does not. Read by the vCPUs when they start."""
        return self.hooks.timing

    @timing.setter
    def timing(self, on: bool) -> None:
        self.hooks.timing = on

    @property
    def stop_requested(self) -> bool:
        return self.control.stop_requested

    @property
    def stop_reason(self) -> Stop | None:
        return self.control.stop_reason

    # --- platform ---------------------------------------------------------------------
    def _create_platform(self) -> None:
        # These three must precede vCPU creation. KVM_SET_TSS_ADDR and the identity
        # map are needed by VMX for real mode; harmless elsewhere.
        k.ioctl(self.fd, k.KVM_SET_TSS_ADDR, layout.KVM_TSS_ADDR)
        try:
            k.ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR,
                    ctypes.c_uint64(layout.KVM_IDENTITY_MAP_ADDR))
        except KvmError:
            pass  # only VMX has it; AMD reports ENOTTY/EINVAL
        k.ioctl(self.fd, k.KVM_CREATE_IRQCHIP)
        k.ioctl(self.fd, k.KVM_CREATE_PIT2, s.kvm_pit_config(flags=k.KVM_PIT_SPEAKER_DUMMY))
        for slot, region in enumerate(self.memory.regions):
            self.set_memory_slot(slot, region.guest_addr, region.size, region.host_addr)

    def set_memory_slot(self, slot: int, guest_addr: int, size: int, host_addr: int,
                        flags: int = 0) -> None:
        k.ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, s.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_addr, memory_size=size,
            userspace_addr=host_addr))

    # --- the in-kernel devices' state (snapshots: vstate/kvmstate.py) ----------------------
    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        chip = s.kvm_irqchip(chip_id=chip_id)
        k.ioctl(self.fd, k.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        k.ioctl(self.fd, k.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.kvm_pit_state2:
        pit = s.kvm_pit_state2()
        k.ioctl(self.fd, k.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: s.kvm_pit_state2) -> None:
        k.ioctl(self.fd, k.KVM_SET_PIT2, pit)

    def get_clock(self) -> s.kvm_clock_data:
        clock = s.kvm_clock_data()
        k.ioctl(self.fd, k.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: s.kvm_clock_data) -> None:
        k.ioctl(self.fd, k.KVM_SET_CLOCK, clock)

    def save_state(self):
        """The in-kernel PIC, IOAPIC, PIT and clock: a VmState (vstate/kvmstate.py)."""
        from .kvmstate import VmState
        return VmState.save(self)

    def restore_state(self, state) -> None:
        state.restore(self)

    def irq_line(self, gsi: int) -> KvmIrqLine:
        return KvmIrqLine(self.fd, gsi)

    def add_pio_device(self, base: int, length: int, device) -> None:
        self.pio_bus.register(base, length, device)

    def add_mmio_device(self, base: int, length: int, device) -> None:
        if self.memory.contains(base) or self.memory.contains(base + length - 1):
            raise PykvmError(f"MMIO range {base:#x}+{length:#x} of {device.name} overlaps RAM")
        self.mmio_bus.register(base, length, device)

    # --- eventfds: the kernel-side fast paths --------------------------------------------
    def new_eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(fd)
        return fd

    def add_ioeventfd(self, addr: int, length: int, fd: int, *, pio: bool = False,
                      datamatch: int | None = None, deassign: bool = False) -> None:
        flags = (k.KVM_IOEVENTFD_FLAG_PIO if pio else 0) \
            | (k.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0) \
            | (k.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        k.ioctl(self.fd, k.KVM_IOEVENTFD, s.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags))

    def add_irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        k.ioctl(self.fd, k.KVM_IRQFD, s.kvm_irqfd(
            fd=fd, gsi=gsi, flags=k.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0))

    # --- vCPUs ------------------------------------------------------------------------------
    def create_vcpus(self, count: int) -> list[Vcpu]:
        supported = self.kvm.supported_cpuid()
        total = len(self.vcpus) + count
        for vcpu_id in range(len(self.vcpus), total):
            vcpu = Vcpu(self.fd, vcpu_id, kvm=self.kvm, memory=self.memory,
                        pio_bus=self.pio_bus, mmio_bus=self.mmio_bus, hooks=self.hooks,
                        control=self.control)
            self.vcpus.append(vcpu)
            self.control.join(vcpu)
            vcpu.set_cpuid(self.quirks.adjust_cpuid(vcpu_cpuid(supported, vcpu_id, total)))
        return self.vcpus

    # --- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if not self.vcpus:
            raise PykvmError("the VM has no vCPUs")
        self.state = State.PAUSED if self.control.paused else State.RUNNING  # paused before start
        self.quirks.on_start(self)
        for vcpu in self.vcpus:
            vcpu.start()
        self._idle_monitor = threading.Thread(target=self._watch_idle, name="idle-monitor",
                                              daemon=True)
        self._idle_monitor.start()

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Block until the VM stops (or ``timeout``); the main thread stays free for signals."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.control.stopped.is_set():
            remaining = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if remaining <= 0:
                return None
            self.control.stopped.wait(remaining)
        for vcpu in self.vcpus:
            if vcpu.thread is not None:
                vcpu.thread.join(timeout=5)
        self.state = State.STOPPED
        return self.stop_reason

    def run(self, timeout: float | None = None) -> Stop | None:
        self.start()
        return self.wait(timeout)

    def request_stop(self, kind: str, status: int, message: str,
                     error: PykvmError | None = None) -> None:
        """Stop every vCPU. The first reason given wins; safe from any thread."""
        self.control.request_stop(Stop(kind, status, message, error))

    def request_stop_error(self, error: PykvmError) -> None:
        self.control.request_stop_error(error)

    def wait_stopped(self, timeout: float | None) -> bool:
        """Block until a stop is requested (True) or ``timeout`` passes (False)."""
        return self.control.stopped.wait(timeout)

    def pause(self) -> None:
        """Stop running guest code on every vCPU; returns once all of them are out of KVM_RUN."""
        control = self.control
        with control.lock:
            if self.state is State.CREATED:
                # Before start: each vCPU's first KVM_RUN returns at once (immediate_exit),
                # before any guest instruction, and waits (a debugger attaches so).
                control.paused = True
                control.kick_all()
                return
            if self.state is not State.RUNNING:
                return
            control.paused = True
            self.state = State.PAUSED
        for vcpu in self.vcpus:
            vcpu.call(lambda v: None)

    def resume(self) -> None:
        with self.control.lock:
            if self.state is not State.PAUSED:
                return
            self.state = State.RUNNING
        self.control.set_paused(False)

    def _watch_idle(self) -> None:
        """Notice a guest that halted with interrupts off: with the in-kernel irqchip
        that HLT never exits to user space (Linux's power-off without ACPI ends so)."""
        last = [-1] * len(self.vcpus)
        while not self.control.stopped.wait(IDLE_CHECK_INTERVAL):
            if self.control.paused:
                continue
            dead = set()
            for i, vcpu in enumerate(self.vcpus):
                total = vcpu.stats.total_exits
                if total == last[i]:
                    try:
                        if vcpu.call(dead_halted, timeout=IDLE_CHECK_INTERVAL * 5):
                            dead.add(i)
                    except (PykvmError, TimeoutError):
                        pass
                last[i] = vcpu.stats.total_exits
            # One dead AP is an offlined CPU (Linux parks it in cli; hlt): the guest goes on.
            # The bootstrap processor dead, or every vCPU, is the guest's end.
            if 0 in dead or (dead and len(dead) == len(self.vcpus)):
                where = f"all {len(dead)} vCPUs" if 1 < len(dead) == len(self.vcpus) else "vCPU 0"
                self.request_stop("halt", 0, f"guest halted with interrupts disabled on {where} "
                                             f"(power-off without ACPI)")

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.state is State.RUNNING or self.state is State.PAUSED:
            self.request_stop("user", 0, "VM closed")
            self.wait(timeout=10)
        monitor = getattr(self, "_idle_monitor", None)
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=10)   # it calls into vCPUs: done before their fds close
        self._close_devices()
        for vcpu in self.vcpus:
            vcpu.close()
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds.clear()
        os.close(self.fd)
        self.fd = -1

    def on_close(self, closer) -> None:
        self._closers.append(closer)

    def devices(self) -> list:
        """Every device object on the PIO and MMIO buses, each once, in registration order."""
        seen, found = set(), []
        for bus in (self.pio_bus, self.mmio_bus):
            for mapping in bus.mappings():
                if id(mapping.device) not in seen:
                    seen.add(id(mapping.device))
                    found.append(mapping.device)
        return found

    def _close_devices(self) -> None:
        """With the vCPUs stopped: flush() every device that has one (serial output, disk
        caches), run the on_close hooks (a PCI bus closes its functions), then close()
        whatever device is still on a bus. One failing device does not stop the rest."""
        def attempt(action) -> None:
            try:
                action()
            except Exception as error:
                logger.warning("closing devices: %s: %s", type(error).__name__, error)

        for device in self.devices():
            if callable(getattr(device, "flush", None)):
                attempt(device.flush)
        for closer in reversed(self._closers):
            attempt(closer)
        self._closers.clear()
        for device in self.devices():
            if callable(getattr(device, "close", None)):
                attempt(device.close)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dead_halted(vcpu: Vcpu) -> bool:
    """HLT with interrupts off: nothing but an NMI or INIT can wake it. An application
    processor still waiting for its INIT/SIPI (MP state UNINITIALIZED or INIT_RECEIVED,
    KVM's start state for non-BSP vCPUs with the in-kernel LAPIC) is not HALTED."""
    return vcpu.get_mp_state() == k.KVM_MP_STATE_HALTED \
        and not vcpu.get_regs().rflags & RFLAGS_IF
