"""What the run loop calls besides the devices: one registered list of hooks.

A hook is any object with some of these methods, called on the vCPU thread after pykvm
handled an exit and before the next KVM_RUN (so a hook may read registers and guest
memory):

- ``pio(vcpu, t0, t1, t_end, port, size, direction, count, value, device_name)``
- ``mmio(vcpu, t0, t1, t_end, addr, length, is_write, value, device_name)``
- ``exit(vcpu, t0, t1, t_end, reason)`` for every other exit
  (the tracer in pykvm/observe/trace.py; gdb's single-step watch);
- ``internal_error(vcpu, suberror) -> bool`` and ``debug_exit(vcpu) -> bool``: handlers,
  asked in order until one returns True (gdb's own breakpoints first, then the host's
  quirks, pykvm/quirks/); none handling the exit stops the VM.

The list is split by method into tuples the loop iterates; an empty tuple costs the
hot path one truth test, as the ``vm.tracer is None`` test it replaces did. The loop
reads them when it starts and again after a kick (Vcpu.kick), so a hook added to a
running VM is seen after the next pause.

:class:`ExitWatch` is the per-vCPU variant for a host quirk that must look at every
port-I/O exit at the price of one unpack and compare (Vcpu.exit_watch).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

KINDS = ("pio", "mmio", "exit", "internal_error", "debug_exit")


class ExitHooks:
    """The hooks of one VM, shared by its vCPUs, called in registration order."""

    def __init__(self):
        self._hooks: list[object] = []
        # Per-exit timing (the guest/pykvm time split) costs two clock reads per exit;
        # --stats wants it without any hook, a plain run does not.
        self.timing = False
        self.pio = self.mmio = self.exit = self.internal_error = self.debug_exit = ()

    def add(self, hook: object, *, first: bool = False) -> None:
        """Register ``hook`` (``first``: ask it before the others, as gdb's breakpoints)."""
        if hook in self._hooks:
            return
        if first:
            self._hooks.insert(0, hook)
        else:
            self._hooks.append(hook)
        self._index()

    def remove(self, hook: object) -> None:
        if hook in self._hooks:
            self._hooks.remove(hook)
            self._index()

    def __contains__(self, hook: object) -> bool:
        return hook in self._hooks

    @property
    def wants_clock(self) -> bool:
        """Whether the loop reads the clock at each exit: someone reads times."""
        return self.timing or bool(self.pio or self.mmio or self.exit)

    def _index(self) -> None:
        for kind in KINDS:
            setattr(self, kind, tuple(getattr(h, kind) for h in self._hooks
                                      if callable(getattr(h, kind, None))))


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

    def parts(self):
        """The run loop's locals: (unpack_from, offset, changed)."""
        return self.fields.unpack_from, self.offset, self.changed


NO_WATCH = (None, 0, None)
