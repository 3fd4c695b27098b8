"""The VM's interrupt routing: which GSI reaches which interrupt controller,
and MSI messages that devices send through irqfds.

KVM_SET_GSI_ROUTING replaces the whole table at once, so one object per VM
owns it: the default irqchip routes for GSIs 0-23 (what KVM sets up by itself,
minus GSI 2, the PIC cascade) plus one MSI route per MSI-X vector that a guest
has programmed. Devices never call the ioctl themselves; they ask this table.

An :class:`EventfdIrqLine` is an eventfd bound to a GSI with KVM_IRQFD: writing
8 bytes to it raises the interrupt without a vCPU exit or an ioctl, from any
thread (the "irqfd -> guest interrupt" end of the virtio data path).
"""

from __future__ import annotations

import os
import threading
import weakref

from . import ioctl as k
from . import layout
from .bus import IrqLine
from .errors import KvmError, PykvmError
from .ioctl import structs as s

IOAPIC_PINS = 24
PIC_CASCADE_GSI = 2   # the slave PIC's input on the master: no device may use it
MAX_ROUTES = 4096     # KVM_MAX_IRQ_ROUTES on x86


class InterruptRoutingError(PykvmError):
    """No GSI is left for a new route, or KVM refused the routing table."""


class GsiRouting:
    """A VM's GSI routing table; thread-safe (vCPU threads reprogram MSI-X vectors)."""

    def __init__(self, vm):
        # A proxy: this table is the value of ``vm``'s entry in a WeakKeyDictionary
        # (gsi_routing), and a value that holds its key strongly keeps it forever -- every
        # VM with MSI-X, its guest RAM and memfd included, until the process ended.
        self._vm = weakref.proxy(vm)
        self._lock = threading.Lock()
        self._msi: dict[int, tuple[int, int]] = {}   # gsi -> (address, data)
        self._free_gsis: list[int] = []
        self._next_gsi = layout.MSI_GSI_BASE
        self.commits = 0

    @staticmethod
    def irqchip_entries() -> list[s.kvm_irq_routing_entry]:
        """KVM's own default routes, GSI 2 (the cascade) left out as on a PC."""
        entries = []
        for gsi in range(16):
            if gsi == PIC_CASCADE_GSI:
                continue
            chip = k.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else k.KVM_IRQCHIP_PIC_SLAVE
            entries.append(_irqchip_entry(gsi, chip, gsi % 8))
        entries += [_irqchip_entry(gsi, k.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(IOAPIC_PINS)]
        return entries

    def allocate_msi_gsi(self) -> int:
        """A GSI for one MSI vector; it has no route until :meth:`set_msi`."""
        with self._lock:
            if self._free_gsis:
                return self._free_gsis.pop()
            if self._next_gsi >= MAX_ROUTES:
                raise InterruptRoutingError(f"all {MAX_ROUTES} GSIs are in use")
            gsi = self._next_gsi
            self._next_gsi += 1
            return gsi

    def release_msi_gsi(self, gsi: int) -> None:
        with self._lock:
            changed = self._msi.pop(gsi, None) is not None
            self._free_gsis.append(gsi)
            if changed:
                self._commit()

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI message (address, data); no ioctl if nothing changed."""
        with self._lock:
            previous = self._msi.get(gsi)
            if previous == (address, data):
                return
            self._msi[gsi] = (address, data)
            try:
                self._commit()
            except KvmError as error:
                # Keep the table KVM accepted: one refused message must not block others.
                if previous is None:
                    del self._msi[gsi]
                else:
                    self._msi[gsi] = previous
                raise InterruptRoutingError(f"KVM refused the MSI route for GSI {gsi} "
                                            f"(address {address:#x}, data {data:#x}): {error}") from None

    def clear_msi(self, gsi: int) -> None:
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._commit()

    def entries(self) -> list[s.kvm_irq_routing_entry]:
        with self._lock:
            return self._entries()

    def _entries(self) -> list[s.kvm_irq_routing_entry]:
        entries = self.irqchip_entries()
        for gsi, (address, data) in sorted(self._msi.items()):
            entry = s.kvm_irq_routing_entry(gsi=gsi, type=k.KVM_IRQ_ROUTING_MSI)
            entry.u.msi.address_lo = address & 0xFFFFFFFF
            entry.u.msi.address_hi = address >> 32
            entry.u.msi.data = data
            entries.append(entry)
        return entries

    def _commit(self) -> None:
        entries = self._entries()
        table = s.flexible(s.kvm_irq_routing, s.kvm_irq_routing_entry, len(entries))()
        table.nr = len(entries)
        for i, entry in enumerate(entries):
            table.entries[i] = entry
        k.ioctl(self._vm.fd, k.KVM_SET_GSI_ROUTING, table)
        self.commits += 1


_routing_of_vm: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_routing_lock = threading.Lock()


def gsi_routing(vm) -> GsiRouting:
    """The one routing table of ``vm`` (created on first use): every device that
    adds MSI routes must share it, or one would overwrite another's table."""
    with _routing_lock:
        routing = _routing_of_vm.get(vm)
        if routing is None:
            routing = _routing_of_vm[vm] = GsiRouting(vm)
        return routing


class EventfdIrqLine(IrqLine):
    """An eventfd bound to ``gsi`` with KVM_IRQFD. Edge semantics: :meth:`trigger`
    (or ``set_level(True)``) injects one interrupt; there is nothing to lower."""

    def __init__(self, vm, gsi: int):
        self.gsi = gsi
        self.fd = vm.new_eventfd()   # closed by the VM
        vm.add_irqfd(self.fd, gsi)
        self._vm = vm
        vm.on_close(self.close)
        self._bound = True

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: an interrupt is pending anyway

    def set_level(self, high: bool) -> None:
        if high:
            self.trigger()

    def pulse(self) -> None:
        self.trigger()

    def close(self) -> None:
        """Detach the irqfd (before the VM closes the eventfd and its own fd)."""
        if self._bound and self._vm.fd >= 0:
            self._bound = False
            try:
                self._vm.add_irqfd(self.fd, self.gsi, deassign=True)
            except PykvmError:
                pass


class SharedLevelLine:
    """A level-triggered GSI shared by several devices (PCI INTx), as a board's
    wired-OR: high while any source holds it high. Without it one device lowering
    the line would swallow another's pending interrupt."""

    def __init__(self, line: IrqLine):
        self._line = line
        self._lock = threading.Lock()
        self._high: set[int] = set()
        self._count = 0

    def source(self) -> IrqLine:
        """A new input of the line, for one device."""
        with self._lock:
            self._count += 1
            return _SharedSource(self, self._count)

    def _set(self, source: int, high: bool) -> None:
        with self._lock:
            was_high = bool(self._high)
            if high:
                self._high.add(source)
            else:
                self._high.discard(source)
            if bool(self._high) != was_high:
                self._line.set_level(not was_high)


class _SharedSource(IrqLine):
    def __init__(self, shared: SharedLevelLine, source: int):
        self._shared, self._source = shared, source

    def set_level(self, high: bool) -> None:
        self._shared._set(self._source, high)


def _irqchip_entry(gsi: int, chip: int, pin: int) -> s.kvm_irq_routing_entry:
    entry = s.kvm_irq_routing_entry(gsi=gsi, type=k.KVM_IRQ_ROUTING_IRQCHIP)
    entry.u.irqchip.irqchip = chip
    entry.u.irqchip.pin = pin
    return entry
