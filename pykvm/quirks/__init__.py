"""What a host's KVM cannot do, and how pykvm completes it.

Nothing outside this package knows which kind of host pykvm runs on: the VM
asks its :class:`Quirks` object to adjust CPUID and the kernel command line and
to complete exits KVM could not, and on a normal VT-x/AMD-V host every answer is
"nothing to do".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..snapshot.state import ComponentState, SnapshotError
from .syscall import Plant


@dataclass(frozen=True)
class QuirksState(ComponentState, tag="quirks"):
    """What pykvm keeps for the guest on this host: which quirks, and on kvm_pvm the
    int3s the system-call completion planted (pykvm/quirks/syscall.py)."""

    name: str
    plants: tuple[Plant, ...]


class Quirks:
    """A host with nothing to work around (kvm_intel, kvm_amd)."""

    name = "none"
    summary: list[str] = []
    symbols = None   # a symbols.SymbolTable (--symbols): names the RIP in a stop message

    def adjust_cpuid(self, entries):
        return entries

    def adjust_cmdline(self, cmdline: str, kernel_version: str | None = None) -> str:
        """The command line Linux gets; ``kernel_version``: the bzImage's version string
        (pykvm/boot/bzimage.py), to tell a distribution's kernel from pykvm's own."""
        return cmdline

    def clock_slowdown(self, kernel_version: str | None = None) -> int:
        """How many times slower than real time a Linux guest's clock runs by default
        (pykvm/machine/boot.py tells Linux its TSC is that many times faster). 1: real
        time, which every host where guest ring 0 runs natively keeps."""
        return 1

    def on_start(self, vm) -> None:
        pass

    def complete_internal_error(self, vcpu, suberror: int) -> bool:
        """Try to finish what KVM could not; True when the guest may go on."""
        return False

    def internal_error(self, vcpu, suberror: int) -> bool:
        """The exit hook (pykvm/vstate/hooks.py) the VM registers this object as."""
        return self.complete_internal_error(vcpu, suberror)

    def save_state(self) -> QuirksState:
        return QuirksState(self.name, ())

    def restore_state(self, state: QuirksState) -> None:
        if state.name != self.name:
            raise SnapshotError(f"quirks of {state.name[:20]} given to {self.name}")
        if state.plants:
            raise SnapshotError(f"{len(state.plants)} page-fault hooks saved for {self.name}, "
                                f"which plants none")


def for_host(kind: str) -> Quirks:
    if kind == "kvm_pvm":
        from .pvm import PvmQuirks
        return PvmQuirks()
    return Quirks()
