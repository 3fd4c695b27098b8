"""One vCPU: its registers, and the KVM_RUN loop on a thread of its own.

The loop is the boundary the project exists to show: KVM_RUN returns only for
exits KVM could not finish in the kernel, and each of those is dispatched here,
in Python, to a device on the PIO or MMIO bus (or to the host's quirks), before
the guest is entered again.

Other threads never touch a running vCPU's fd: they ask, with :meth:`Vcpu.call`
(the request is queued and the vCPU is kicked out of KVM_RUN with a signal), and
the vCPU thread answers between two runs.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import queue
import signal
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from . import ioctl as k
from . import sandbox
from .errors import GuestCrashed, KvmError, PykvmError
from .ioctl import structs as s
from .observe.stats import VcpuStats

if TYPE_CHECKING:
    from .vm import Vm

# The signal that kicks a vCPU thread out of KVM_RUN. A real-time signal, so it
# cannot collide with what an embedding application uses SIGUSR1/2 for.
KICK_SIGNAL = signal.SIGRTMIN + 4

_EXIT_AND_IO = struct.Struct("<I20xBBHIQ")   # kvm_run.exit_reason at 8, kvm_run.io at 32
_DATA_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_DATA_UNPACK = {size: struct.Struct(f).unpack_from for size, f in _DATA_FORMATS.items()}
_DATA_PACK = {size: struct.Struct(f).pack_into for size, f in _DATA_FORMATS.items()}
_MASKS = {size: (1 << (8 * size)) - 1 for size in _DATA_FORMATS}
_NO_CLOCK = itertools.repeat(0).__next__     # stands in for the clock when nobody reads times

# KVM_RUN through its own ctypes function object without argtypes: ctypes then
# passes the three ints as they are, skipping the per-call argument conversion
# (measured ~0.6 µs per exit by bench/profile_exits.py). The third argument must be 0.
_kvm_run_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_kvm_run_ioctl.restype = ctypes.c_int
_MMIO = struct.Struct("<Q8sIB")              # kvm_run.mmio at offset 32
_EXIT_OFFSET = s.kvm_run.io.offset
_IMMEDIATE_EXIT_OFFSET = s.kvm_run.immediate_exit.offset
# Where KVM stores the special registers at each exit once asked to (KVM_CAP_SYNC_REGS,
# kvm_run.kvm_valid_regs |= KVM_SYNC_X86_SREGS; api.rst "kvm_valid_regs"): a copy made in
# the kernel while the vCPU is loaded costs ~0.15 µs per exit on kvm_pvm, a KVM_GET_SREGS
# ioctl ~4.8 µs (C, measured side by side in bench/exits.py's loop).
SYNCED_SREGS_OFFSET = s.kvm_run.s.offset + s.kvm_sync_regs.sregs.offset

RFLAGS_IF = 1 << 9


@dataclass(frozen=True)
class ExitWatch:
    """Fields of kvm_run a host quirk watches after each port-I/O exit (Vcpu.exit_watch).

    The run loop unpacks ``fields`` at ``offset`` and calls ``changed(value)`` only when
    the value differs from what the last call returned; ``changed`` returns None to be
    called at the next exit whatever the fields hold. So an exit at which nothing changed
    costs one unpack and one compare, in the loop itself, with no call (quirks/syscall.py's
    EarlyPlant: the special registers KVM stores there with KVM_SYNC_X86_SREGS)."""

    fields: struct.Struct
    offset: int
    changed: Callable[[tuple], tuple | None]


def _watch_parts(watch: ExitWatch | None):
    """The run loop's locals for ``watch``: (unpack_from, offset, changed), or Nones."""
    if watch is None:
        return None, 0, None
    return watch.fields.unpack_from, watch.offset, watch.changed


class Vcpu:
    def __init__(self, vm: "Vm", vcpu_id: int):
        self.vm = vm
        self.id = vcpu_id
        self.fd = k.ioctl(vm.fd, k.KVM_CREATE_VCPU, vcpu_id)
        try:
            self._run_map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self.run_struct = s.kvm_run.from_buffer(self._run_map)
        self.stats = VcpuStats(vcpu_id)
        self.thread: threading.Thread | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._in_run = False
        # What a host quirk watches in kvm_run after each port-I/O exit, while set (see
        # ExitWatch). The run loop picks up a change at its next slow-path exit or kick.
        self.exit_watch: ExitWatch | None = None

    # --- registers and state (call on the vCPU thread, or before it starts) ----------
    def _get(self, request: int, struct_type):
        value = struct_type()
        k.ioctl(self.fd, request, value)
        return value

    def get_regs(self) -> s.kvm_regs:
        return self._get(k.KVM_GET_REGS, s.kvm_regs)

    def set_regs(self, regs: s.kvm_regs) -> None:
        k.ioctl(self.fd, k.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        return self._get(k.KVM_GET_SREGS, s.kvm_sregs)

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        k.ioctl(self.fd, k.KVM_SET_SREGS, sregs)

    def sync_sregs(self, enabled: bool) -> None:
        """Have KVM store the special registers into kvm_run at every exit (or stop it).
        Safe from any thread: KVM reads the flag once per KVM_RUN."""
        flags = self.run_struct.kvm_valid_regs
        self.run_struct.kvm_valid_regs = (flags | k.KVM_SYNC_X86_SREGS) if enabled \
            else (flags & ~k.KVM_SYNC_X86_SREGS)

    def synced_sregs(self) -> s.kvm_sregs:
        """The special registers as of the last exit, from kvm_run (after sync_sregs(True);
        on the vCPU thread, between two runs)."""
        return s.kvm_sregs.from_buffer_copy(self._run_map, SYNCED_SREGS_OFFSET)

    @property
    def run_buffer(self) -> mmap.mmap:
        """The shared kvm_run page (read it only on the vCPU thread, between two runs)."""
        return self._run_map

    def get_fpu(self) -> s.kvm_fpu:
        return self._get(k.KVM_GET_FPU, s.kvm_fpu)

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        k.ioctl(self.fd, k.KVM_SET_FPU, fpu)

    def get_lapic(self) -> s.kvm_lapic_state:
        return self._get(k.KVM_GET_LAPIC, s.kvm_lapic_state)

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        k.ioctl(self.fd, k.KVM_SET_LAPIC, lapic)

    def get_events(self) -> s.kvm_vcpu_events:
        return self._get(k.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events)

    def set_events(self, events: s.kvm_vcpu_events) -> None:
        k.ioctl(self.fd, k.KVM_SET_VCPU_EVENTS, events)

    def tsc_khz(self) -> int:
        """The guest TSC's frequency in kHz, as KVM runs it."""
        return k.ioctl(self.fd, k.KVM_GET_TSC_KHZ)

    def get_mp_state(self) -> int:
        return self._get(k.KVM_GET_MP_STATE, s.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        k.ioctl(self.fd, k.KVM_SET_MP_STATE, s.kvm_mp_state(state))

    def get_debugregs(self) -> s.kvm_debugregs:
        return self._get(k.KVM_GET_DEBUGREGS, s.kvm_debugregs)

    def set_debugregs(self, debugregs: s.kvm_debugregs) -> None:
        k.ioctl(self.fd, k.KVM_SET_DEBUGREGS, debugregs)

    def get_xcrs(self) -> s.kvm_xcrs:
        return self._get(k.KVM_GET_XCRS, s.kvm_xcrs)

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        k.ioctl(self.fd, k.KVM_SET_XCRS, xcrs)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buffer = s.flexible(s.kvm_msrs, s.kvm_msr_entry, len(indices))()
        buffer.nmsrs = len(indices)
        for entry, index in zip(buffer.entries, indices):
            entry.index = index
        done = k.ioctl(self.fd, k.KVM_GET_MSRS, buffer)
        return {entry.index: entry.data for entry in buffer.entries[:done]}

    def set_msrs(self, values: dict[int, int]) -> int:
        buffer = s.flexible(s.kvm_msrs, s.kvm_msr_entry, len(values))()
        buffer.nmsrs = len(values)
        for entry, (index, data) in zip(buffer.entries, values.items()):
            entry.index, entry.data = index, data
        return k.ioctl(self.fd, k.KVM_SET_MSRS, buffer)

    def set_cpuid(self, entries: list[s.kvm_cpuid_entry2]) -> None:
        buffer = s.flexible(s.kvm_cpuid2, s.kvm_cpuid_entry2, len(entries))()
        buffer.nent = len(entries)
        for slot, entry in zip(buffer.entries, entries):
            ctypes.memmove(ctypes.addressof(slot), ctypes.addressof(entry), ctypes.sizeof(entry))
        k.ioctl(self.fd, k.KVM_SET_CPUID2, buffer)

    def get_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        buffer = s.flexible(s.kvm_cpuid2, s.kvm_cpuid_entry2, 256)()
        buffer.nent = 256
        k.ioctl(self.fd, k.KVM_GET_CPUID2, buffer)
        return [s.kvm_cpuid_entry2.from_buffer_copy(e) for e in buffer.entries[:buffer.nent]]

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        debug = s.kvm_guest_debug(control=control)
        for i, value in enumerate(debugreg or []):
            debug.arch.debugreg[i] = value
        k.ioctl(self.fd, k.KVM_SET_GUEST_DEBUG, debug)

    def translate(self, linear: int) -> int | None:
        """Guest-linear to guest-physical through the vCPU's current paging (KVM_TRANSLATE)."""
        translation = s.kvm_translation(linear_address=linear)
        k.ioctl(self.fd, k.KVM_TRANSLATE, translation)
        return translation.physical_address if translation.valid else None

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        events = self.get_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = int(error_code is not None)
        events.exception.error_code = error_code or 0
        events.exception.pending = 0
        events.flags = 0
        self.set_events(events)

    def save_state(self) -> dict:
        """Everything KVM holds for this vCPU, JSON-able (pykvm/snapshot/kvmstate.py)."""
        sandbox.wait_for_preload()   # on a confined vCPU thread: imported in the background
        from .snapshot.kvmstate import save_vcpu
        return save_vcpu(self)

    def restore_state(self, state: dict) -> None:
        sandbox.wait_for_preload()   # on a confined vCPU thread: imported in the background
        from .snapshot.kvmstate import restore_vcpu
        restore_vcpu(self, state, log=self.vm.log)

    def describe_registers(self) -> str:
        """A register dump for crash messages."""
        try:
            regs, sregs = self.get_regs(), self.get_sregs()
        except KvmError as error:
            return f"(registers unavailable: {error})"
        gprs = " ".join(f"{name}={getattr(regs, name):#x}" for name, _ in s.kvm_regs._fields_)
        return (f"{gprs}\ncs={sregs.cs.selector:#x} ss={sregs.ss.selector:#x} "
                f"cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} "
                f"efer={sregs.efer:#x} idt={sregs.idt.base:#x}/{sregs.idt.limit:#x} "
                f"gdt={sregs.gdt.base:#x}/{sregs.gdt.limit:#x}")

    # --- cross-thread requests ----------------------------------------------------------
    def call(self, function: Callable[["Vcpu"], object], timeout: float | None = 10.0):
        """Run ``function(self)`` on the vCPU thread between two KVM_RUNs; return its result."""
        if self.thread is None or threading.current_thread() is self.thread \
                or not self.thread.is_alive():
            return function(self)
        future: Future = Future()
        self._requests.put((function, future))
        self.kick()
        self.vm.wake_paused()
        return future.result(timeout)

    def kick(self) -> None:
        """Make KVM_RUN return (EINTR) soon, whether or not the guest is inside it now."""
        self._run_map[_IMMEDIATE_EXIT_OFFSET] = 1
        thread = self.thread
        if thread is not None and thread.ident is not None and thread.is_alive():
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _serve_requests(self) -> None:
        while True:
            try:
                function, future = self._requests.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(self))
                except BaseException as error:  # handed to the caller, who re-raises it
                    future.set_exception(error)

    # --- the run loop ---------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.id}", daemon=True)
        self.thread.start()

    def _thread_main(self) -> None:
        self.stats.started_ns = time.perf_counter_ns()
        try:
            sandbox.thread_role("vcpu")   # pykvm/sandbox: seccomp, unless --no-seccomp
            self.run_loop()
        except PykvmError as error:
            self.vm.request_stop_error(error)
        except BaseException as error:  # never let a vCPU thread die silently
            self.vm.request_stop_error(PykvmError(f"vCPU {self.id}: internal error: {error!r}"))
            self.vm.log_exception(error)
        finally:
            self.stats.stopped_ns = time.perf_counter_ns()
            self._serve_requests()

    def run_loop(self) -> None:
        """Enter the guest until the VM stops.

        The port-I/O path is the hot one (every legacy device lives there) and is
        written for speed, measured by bench/exits.py: locals only, one struct
        unpack for the exit reason and kvm_run.io together, one dict lookup for
        the port, two clock reads per exit (the read before KVM_RUN also ends the
        previous exit's handler time), and none at all unless someone reads the
        time split (``vm.timing``: --stats, a tracer)."""
        vm = self.vm
        fd = self.fd
        run_ioctl = _kvm_run_ioctl
        request_run = k.KVM_RUN
        buf = self._run_map
        unpack_exit = _EXIT_AND_IO.unpack_from
        unpack_data = _DATA_UNPACK
        pack_data = _DATA_PACK
        pio = vm.pio_bus
        clock = time.perf_counter_ns if vm.timing or vm.tracer is not None else _NO_CLOCK
        stats = self.stats
        exits = stats.exits
        port_counts = stats.port_counts
        device_counts = stats.devices
        exit_io = k.KVM_EXIT_IO
        trace = vm.tracer
        watch = self.exit_watch
        watch_unpack, watch_offset, watch_changed = _watch_parts(watch)
        watched = None
        guest_ns = handler_ns = 0
        t1 = clock()
        try:
            while not vm.stop_requested:
                t0 = clock()
                handler_ns += t0 - t1
                rc = run_ioctl(fd, request_run, 0)
                t1 = clock()
                guest_ns += t1 - t0
                if rc < 0:
                    stats.guest_ns += guest_ns
                    stats.handler_ns += handler_ns
                    guest_ns = handler_ns = 0
                    err = ctypes.get_errno()
                    if err not in (errno.EINTR, errno.EAGAIN):
                        raise KvmError("KVM_RUN", err)
                    buf[_IMMEDIATE_EXIT_OFFSET] = 0
                    self._serve_requests()
                    vm.wait_while_paused(self)
                    if self.exit_watch is not watch:
                        watch, watched = self.exit_watch, None
                        watch_unpack, watch_offset, watch_changed = _watch_parts(watch)
                    continue
                reason, direction, size, port, count, data_offset = unpack_exit(buf, 8)
                exits[reason] += 1
                if reason == exit_io:
                    entry = pio.ports.get(port)
                    if entry is not None and count == 1:
                        device, offset = entry
                        if direction:  # out
                            value = buf[data_offset] if size == 1 \
                                else unpack_data[size](buf, data_offset)[0]
                            device.write(offset, size, value)
                        else:
                            value = device.read(offset, size) & _MASKS[size]
                            pack_data[size](buf, data_offset, value)
                        device_counts[device.name] += 1
                    else:
                        value = self._string_io(direction, size, port, count, data_offset, entry)
                    port_counts[port << 1 | direction] += 1
                    if watch_changed is not None:
                        now = watch_unpack(buf, watch_offset)
                        if now != watched:
                            watched = watch_changed(now)
                    if trace is not None:
                        trace.pio(self, t0, t1, clock(), port, size, direction, count, value,
                                  entry[0].name if entry else None)
                else:
                    stats.guest_ns += guest_ns
                    stats.handler_ns += handler_ns
                    guest_ns = handler_ns = 0
                    self._handle_exit(reason, t0, t1)
                    if self.exit_watch is not watch:
                        watch, watched = self.exit_watch, None
                        watch_unpack, watch_offset, watch_changed = _watch_parts(watch)
                    if trace is not None and reason != k.KVM_EXIT_MMIO:
                        trace.exit(self, t0, t1, clock(), reason)
        finally:
            stats.guest_ns += guest_ns
            stats.handler_ns += handler_ns + (clock() - t1)

    def _string_io(self, direction: int, size: int, port: int, count: int, data_offset: int,
                   entry) -> int:
        """`rep ins/outs` (count > 1) and accesses to ports no device owns."""
        buf = self._run_map
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
            self.stats.unhandled_pio += count
        else:
            self.stats.devices[entry[0].name] += count
        return value

    def _handle_exit(self, reason: int, t0: int, t1: int) -> None:
        vm = self.vm
        run = self.run_struct
        if reason == k.KVM_EXIT_MMIO:
            self._mmio(t0, t1)
        elif reason == k.KVM_EXIT_INTERNAL_ERROR:
            if vm.debugger is not None and vm.debugger.on_internal_error(self):
                pass  # the debugger's own int3 (kvm_pvm reports it so)
            elif not vm.quirks.complete_internal_error(self, run.internal.suberror):
                raise GuestCrashed(self._internal_error_message())
        elif reason == k.KVM_EXIT_HLT:
            # Only without an in-kernel irqchip: the guest has nothing left to do.
            vm.request_stop("halt", 0, f"vCPU {self.id} halted")
        elif reason == k.KVM_EXIT_SHUTDOWN:
            vm.request_stop_error(GuestCrashed(
                f"guest triple fault on vCPU {self.id} (it reset itself after an unhandled "
                f"exception):\n{self.describe_registers()}"))
        elif reason == k.KVM_EXIT_FAIL_ENTRY:
            fail = run.fail_entry
            raise GuestCrashed(
                f"KVM could not enter the guest on vCPU {self.id} (hardware entry failure "
                f"reason {fail.hardware_entry_failure_reason:#x}): the vCPU state is invalid\n"
                f"{self.describe_registers()}")
        elif reason == k.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == k.KVM_SYSTEM_EVENT_RESET:
                vm.request_stop("reset", 0, "guest requested a reset")
            elif kind == k.KVM_SYSTEM_EVENT_CRASH:
                vm.request_stop_error(GuestCrashed(f"guest reported a crash on vCPU {self.id}"))
            else:
                vm.request_stop("poweroff", 0, "guest powered off")
        elif reason == k.KVM_EXIT_DEBUG:
            if vm.debugger is None or not vm.debugger.on_debug_exit(self):
                arch = run.debug.arch
                raise GuestCrashed(f"unexpected debug exit on vCPU {self.id}: exception "
                                   f"{arch.exception} at {arch.pc:#x}")
        elif reason == k.KVM_EXIT_IRQ_WINDOW_OPEN or reason == k.KVM_EXIT_INTR:
            pass
        else:
            raise GuestCrashed(f"unhandled KVM exit {k.EXIT_NAMES.get(reason, reason)} on vCPU "
                               f"{self.id}\n{self.describe_registers()}")

    def _mmio(self, t0: int, t1: int) -> None:
        buf = self._run_map
        addr, data, length, is_write = _MMIO.unpack_from(buf, _EXIT_OFFSET)
        length = min(length, 8)
        mapping = self.vm.mmio_bus.find(addr)
        stats = self.stats
        stats.mmio[(addr, "write" if is_write else "read")] += 1
        if mapping is None:
            stats.unhandled_mmio += 1
            value = int.from_bytes(data[:length], "little") if is_write else (1 << 8 * length) - 1
            if not is_write:
                buf[_EXIT_OFFSET + 8:_EXIT_OFFSET + 8 + length] = value.to_bytes(length, "little")
        else:
            device = mapping.device
            offset = addr - mapping.base
            if is_write:
                value = int.from_bytes(data[:length], "little")
                device.write(offset, length, value)
            else:
                value = device.read(offset, length) & ((1 << 8 * length) - 1)
                buf[_EXIT_OFFSET + 8:_EXIT_OFFSET + 8 + length] = value.to_bytes(length, "little")
            stats.devices[device.name] += 1
        trace = self.vm.tracer
        if trace is not None:
            trace.mmio(self, t0, t1, time.perf_counter_ns(), addr, length, is_write, value,
                       mapping.device.name if mapping else None)

    def _internal_error_message(self) -> str:
        internal = self.run_struct.internal
        suberror = {k.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
                    k.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
                    k.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed"}.get(
            internal.suberror, f"suberror {internal.suberror}")
        detail = ""
        try:
            rip, code = self.vm.quirks.instruction_at_rip(self)
            detail = f" at rip {rip:#x}, instruction bytes {code.hex(' ')}"
        except PykvmError as error:
            detail = f" ({error})"
        return f"KVM internal error on vCPU {self.id}: {suberror}{detail}\n{self.describe_registers()}"

    def close(self) -> None:
        if self.fd < 0:
            return
        del self.run_struct
        try:
            self._run_map.close()
        except BufferError:
            pass
        os.close(self.fd)
        self.fd = -1
