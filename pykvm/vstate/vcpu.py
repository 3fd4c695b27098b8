"""One vCPU: its registers, and the KVM_RUN loop on a thread of its own.

The loop is the boundary the project exists to show: KVM_RUN returns only for
exits KVM could not finish in the kernel, and each of those is dispatched here,
in Python, to a device on the PIO or MMIO bus (exits.py for all but plain port I/O),
or to a hook (hooks.py: the tracer, gdb, the host's quirks), before the guest is
entered again.

The vCPU is given what it runs with (its buses, guest memory, the VM's hook list
and the stop/pause channel, control.py) and never imports or calls the VM.
Other threads never touch a running vCPU's fd: they ask, with :meth:`Vcpu.call`
(the request is queued and the vCPU is kicked out of KVM_RUN with a signal), and
the vCPU thread answers between two runs.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import mmap
import os
import queue
import signal
import threading
import time
from typing import Callable

from .. import ioctl as k
from .. import sandbox
from ..errors import KvmError, PykvmError
from ..ioctl import run
from ..ioctl import structs as s
from ..observe.stats import VcpuStats
from . import exits, nextrun
from .control import RunControl
from .hooks import NO_WATCH, ExitHooks, ExitWatch
from .reply import Reply

logger = logging.getLogger(__name__)

# The signal that kicks a vCPU thread out of KVM_RUN. A real-time signal, so it
# cannot collide with what an embedding application uses SIGUSR1/2 for.
KICK_SIGNAL = signal.SIGRTMIN + 4

_NO_CLOCK = itertools.repeat(0).__next__     # stands in for the clock when nobody reads times

# KVM_RUN through its own ctypes function object without argtypes: ctypes then
# passes the three ints as they are, skipping the per-call argument conversion
# (measured ~0.6 µs per exit by bench/profile_exits.py). The third argument must be 0.
_kvm_run_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_kvm_run_ioctl.restype = ctypes.c_int
_IMMEDIATE_EXIT_OFFSET = run.IMMEDIATE_EXIT_OFFSET
# KVM stores the special registers into kvm_run at each exit once asked to
# (sync_sregs): a copy made in the kernel while the vCPU is loaded costs ~0.15 µs per
# exit on kvm_pvm, a KVM_GET_SREGS ioctl ~4.8 µs (C, measured side by side in
# bench/exits.py's loop).
_SYNCED_SREGS_OFFSET = run.SYNCED_SREGS_OFFSET

RFLAGS_IF = 1 << 9


def _watch_parts(watch: ExitWatch | None):
    """The run loop's locals for ``watch``: (unpack_from, offset, changed), or Nones."""
    return NO_WATCH if watch is None else watch.parts()


class Vcpu:
    """One KVM vCPU of the VM whose fd is ``vm_fd``: ``kvm`` is the /dev/kvm handle (its
    mmap size and capabilities), ``memory`` the guest RAM, ``pio_bus``/``mmio_bus`` the
    devices, ``hooks`` and ``control`` shared with the VM's other vCPUs."""

    def __init__(self, vm_fd: int, vcpu_id: int, *, kvm, memory, pio_bus, mmio_bus,
                 hooks: ExitHooks, control: RunControl):
        self.id = vcpu_id
        self.kvm = kvm
        self.memory = memory
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.hooks = hooks
        self.control = control
        self.fd = k.ioctl(vm_fd, k.KVM_CREATE_VCPU, vcpu_id)
        try:
            self._run_map = mmap.mmap(self.fd, kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self.run_struct = s.kvm_run.from_buffer(self._run_map)
        self.stats = VcpuStats(vcpu_id)
        self.thread: threading.Thread | None = None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        # What a host quirk watches in kvm_run after each port-I/O exit, while set (see
        # ExitWatch). The run loop picks up a change at its next slow-path exit or kick.
        self.exit_watch: ExitWatch | None = None

    # --- registers and state (call on the vCPU thread, or before it starts) ----------
    def _get(self, request: int, struct_type):
        value = struct_type()
        k.ioctl(self.fd, request, value)
        return value

    def get_regs(self) -> s.kvm_regs:
        return nextrun.pending(self.run_struct) or self._get(k.KVM_GET_REGS, s.kvm_regs)

    def set_regs(self, regs: s.kvm_regs, *, at_next_run: bool = False) -> None:
        """``at_next_run``: KVM loads them at the next KVM_RUN, no ioctl (nextrun.py)."""
        if not nextrun.hand_over(self.run_struct, regs, at_next_run, self.kvm):
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
        return s.kvm_sregs.from_buffer_copy(self._run_map, _SYNCED_SREGS_OFFSET)

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

    def get_xsave(self) -> s.kvm_xsave:
        return self._get(k.KVM_GET_XSAVE, s.kvm_xsave)

    def set_xsave(self, xsave: s.kvm_xsave) -> None:
        k.ioctl(self.fd, k.KVM_SET_XSAVE, xsave)

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

    def save_state(self):
        """Everything KVM holds for this vCPU: a VcpuState (vstate/kvmstate.py)."""
        sandbox.wait_for_preload()   # on a confined vCPU thread: imported in the background
        from .kvmstate import VcpuState
        return VcpuState.save(self)

    def restore_state(self, state) -> None:
        sandbox.wait_for_preload()   # on a confined vCPU thread: imported in the background
        state.restore(self)

    # --- cross-thread requests ----------------------------------------------------------
    def call(self, function: Callable[["Vcpu"], object], timeout: float | None = 10.0):
        """Run ``function(self)`` on the vCPU thread between two KVM_RUNs; return its result."""
        if self.thread is None or threading.current_thread() is self.thread \
                or not self.thread.is_alive():
            return function(self)
        reply = Reply()
        self._requests.put((function, reply))
        self.kick()
        self.control.wake_paused()
        return reply.result(timeout)

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
                function, reply = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                reply.set_result(function(self))
            except BaseException as error:  # handed to the caller, who re-raises it
                reply.set_exception(error)

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
            self.control.request_stop_error(error)
        except BaseException as error:  # never let a vCPU thread die silently
            self.control.request_stop_error(
                PykvmError(f"vCPU {self.id}: internal error: {error!r}"))
            logger.error("vCPU %d: internal error", self.id, exc_info=error)
        finally:
            self.stats.stopped_ns = time.perf_counter_ns()
            self._serve_requests()

    def run_loop(self) -> None:
        """Enter the guest until the VM stops.

        The port-I/O path is the hot one (every legacy device lives there) and is
        written for speed, measured by bench/exits.py: locals only, one struct
        unpack for the exit reason and kvm_run.io together (ioctl/run.py), one dict
        lookup for the port, two clock reads per exit (the read before KVM_RUN also
        ends the previous exit's handler time), and none at all unless someone reads
        the time split (``hooks.timing``: --stats, or any pio/mmio/exit hook). Every
        other exit goes to exits.handle."""
        control = self.control
        hooks = self.hooks
        fd = self.fd
        run_ioctl = _kvm_run_ioctl
        request_run = k.KVM_RUN
        buf = self._run_map
        unpack_exit = run.EXIT_AND_IO.unpack_from
        reason_at = run.EXIT_REASON_OFFSET
        unpack_data = run.DATA_UNPACK
        pack_data = run.DATA_PACK
        masks = run.DATA_MASKS
        ports = self.pio_bus.ports
        handle = exits.handle
        string_io = exits.string_io
        clock = time.perf_counter_ns if hooks.wants_clock else _NO_CLOCK
        stats = self.stats
        exits_by_reason = stats.exits
        port_counts = stats.port_counts
        device_counts = stats.devices
        exit_io = k.KVM_EXIT_IO
        pio_hooks = hooks.pio
        watch = self.exit_watch
        watch_unpack, watch_offset, watch_changed = _watch_parts(watch)
        watched = None
        guest_ns = handler_ns = 0
        t1 = clock()
        try:
            while not control.stop_requested:
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
                    control.wait_while_paused(self._serve_requests)
                    pio_hooks = hooks.pio
                    if self.exit_watch is not watch:
                        watch, watched = self.exit_watch, None
                        watch_unpack, watch_offset, watch_changed = _watch_parts(watch)
                    continue
                reason, direction, size, port, count, data_offset = unpack_exit(buf, reason_at)
                exits_by_reason[reason] += 1
                if reason == exit_io:
                    entry = ports.get(port)
                    if entry is not None and count == 1:
                        device, offset = entry
                        if direction:  # out
                            value = buf[data_offset] if size == 1 \
                                else unpack_data[size](buf, data_offset)[0]
                            device.write(offset, size, value)
                        else:
                            value = device.read(offset, size) & masks[size]
                            pack_data[size](buf, data_offset, value)
                        device_counts[device.name] += 1
                    else:
                        value = string_io(self, direction, size, port, count, data_offset, entry)
                    port_counts[port << 1 | direction] += 1
                    if watch_changed is not None:
                        now = watch_unpack(buf, watch_offset)
                        if now != watched:
                            watched = watch_changed(now)
                    if pio_hooks:
                        name = entry[0].name if entry else None
                        for hook in pio_hooks:
                            hook(self, t0, t1, clock(), port, size, direction, count, value, name)
                else:
                    stats.guest_ns += guest_ns
                    stats.handler_ns += handler_ns
                    guest_ns = handler_ns = 0
                    stop = handle(self, reason, t0, t1)
                    if stop is not None:
                        control.request_stop(stop)
                    if self.exit_watch is not watch:
                        watch, watched = self.exit_watch, None
                        watch_unpack, watch_offset, watch_changed = _watch_parts(watch)
        finally:
            stats.guest_ns += guest_ns
            stats.handler_ns += handler_ns + (clock() - t1)

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
