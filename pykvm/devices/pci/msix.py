"""MSI-X: the capability in config space, and the vector table and pending-bit
array (PBA) that live in one of the function's memory BARs.

Each vector owns a GSI of the VM's routing table and an eventfd bound to it
with KVM_IRQFD, so a device thread raises an interrupt with one eventfd write,
no exit and no ioctl. The guest's table writes (vCPU threads, rare) update the
GSI's MSI route; masking is done here: a masked vector's interrupt is kept as
a pending bit and delivered when the vector is unmasked (PCI spec behaviour).

Layout facts (PCI Local Bus 3.0, 6.8.2): capability ID 0x11; Message Control
bits 10:0 = table size - 1, bit 14 Function Mask, bit 15 Enable; then two
dwords "offset | BIR" for the table and the PBA. A table entry is 16 bytes:
message address low, high, message data, vector control (bit 0 = masked).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Annotated, Callable

from ...bus import Device
from ...errors import ConfigError
from ...snapshot.schema import U32, Bounds, blob
from ...snapshot.state import ComponentState, SnapshotError
from ...interrupts import EventfdIrqLine, InterruptRoutingError, gsi_routing
from .config import ConfigSpace

CAP_ID_MSIX = 0x11
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
ENTRY_SIZE = 16
VECTOR_MASKED = 1
MAX_VECTORS = 2048
NO_VECTOR = 0xFFFF   # "no MSI-X vector" as virtio (and others) spell it


@dataclass(frozen=True)
class MsixState(ComponentState, tag="msix"):
    """The vector table, pending bits and each vector's GSI (Enable and Function Mask
    live in config space, saved with it)."""

    table: blob(ENTRY_SIZE * MAX_VECTORS)
    pending: tuple[Annotated[int, Bounds(0, MAX_VECTORS - 1)], ...]
    gsis: tuple[U32 | None, ...]


class MsixTable(Device):
    """Vector table + PBA, and the delivery logic. ``table_offset`` and
    ``pba_offset`` are offsets in BAR ``bar_index``; map :meth:`table_device` and
    :meth:`pba_device` there."""

    name = "msix"

    def __init__(self, vm, config: ConfigSpace, vectors: int, bar_index: int,
                 table_offset: int, pba_offset: int, *, interrupt_lines=None):
        if not 1 <= vectors <= MAX_VECTORS:
            raise ConfigError(f"MSI-X: {vectors} vectors (1..{MAX_VECTORS})")
        self.vectors = vectors
        self._lock = threading.Lock()
        self._table = bytearray(ENTRY_SIZE * vectors)
        for vector in range(vectors):
            self._table[vector * ENTRY_SIZE + 12] = VECTOR_MASKED  # masked at reset
        self._pending = [False] * vectors
        self._config = config
        if interrupt_lines is None:
            routing = gsi_routing(vm)
            self._routing = routing
            interrupt_lines = [EventfdIrqLine(vm, routing.allocate_msi_gsi())
                               for _ in range(vectors)]
        else:
            self._routing = None   # tests: fake lines, no KVM
        self._lines = interrupt_lines
        self.delivered = [0] * vectors
        self.refused_routes = 0
        # The owner's hook, called (no lock held) after anything that can change which
        # vectors deliver: a table write, Enable or Function Mask, a restore.
        self.on_change: Callable[[], None] | None = None
        body = struct.pack("<HII", vectors - 1, table_offset | bar_index, pba_offset | bar_index)
        writable = struct.pack("<HII", CONTROL_ENABLE | CONTROL_FUNCTION_MASK, 0, 0)
        self.offset = config.add_capability(CAP_ID_MSIX, body, writable, self._control_written)

    # --- state -----------------------------------------------------------------------------
    @property
    def control(self) -> int:
        return self._config.get(self.offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & CONTROL_FUNCTION_MASK)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """(message address, data, masked) of ``vector``."""
        lo, hi, data, control = struct.unpack_from("<IIII", self._table, vector * ENTRY_SIZE)
        return hi << 32 | lo, data, bool(control & VECTOR_MASKED)

    def pending(self, vector: int) -> bool:
        return self._pending[vector]

    def direct_fd(self, vector: int) -> int | None:
        """The irqfd a writer may signal to deliver ``vector`` with no pykvm thread in
        the way (a vhost-user back end's call fd): only while a write to it is exactly
        what :meth:`notify` would do -- MSI-X enabled, neither the function nor the
        vector masked (PCI 3.0 6.8.2.9: a masked vector's message is held as a pending
        bit, which only pykvm can set). None otherwise, or for a line with no eventfd."""
        with self._lock:
            if not self.enabled or self.function_masked or not 0 <= vector < self.vectors \
                    or self._table[vector * ENTRY_SIZE + 12] & VECTOR_MASKED:
                return None
        return getattr(self._lines[vector], "fd", None)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # --- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> MsixState:
        with self._lock:
            return MsixState(bytes(self._table),
                             tuple(v for v in range(self.vectors) if self._pending[v]),
                             tuple(getattr(line, "gsi", None) for line in self._lines))

    def restore_state(self, state: MsixState) -> None:
        """After the config space: restores the table and routes the live vectors."""
        if len(state.table) != len(self._table):
            raise SnapshotError(f"MSI-X table of {len(state.table)} bytes, not "
                                f"{len(self._table)}")
        if list(state.gsis) != [getattr(line, "gsi", None) for line in self._lines]:
            raise SnapshotError("MSI-X vectors sit on other GSIs than when the snapshot was "
                                "taken")
        if any(vector >= self.vectors for vector in state.pending):
            raise SnapshotError(f"MSI-X: a pending vector beyond this table's {self.vectors}")
        with self._lock:
            self._table[:] = state.table
            self._pending = [False] * self.vectors
            for vector in state.pending:
                self._pending[vector] = True
        self._deliver_unmasked()
        self._changed()

    # --- the device's side -----------------------------------------------------------------
    def notify(self, vector: int) -> bool:
        """Signal ``vector`` (any thread). False if MSI-X is off or the vector does not
        exist, so the caller can fall back to INTx."""
        with self._lock:
            if not self.enabled or not 0 <= vector < self.vectors:
                return False
            if self.function_masked or self._table[vector * ENTRY_SIZE + 12] & VECTOR_MASKED:
                self._pending[vector] = True
                return True
        self._fire(vector)
        return True

    def _fire(self, vector: int) -> None:
        self.delivered[vector] += 1
        self._lines[vector].trigger()

    def _deliver_unmasked(self) -> None:
        """After a mask or enable change: route live vectors, deliver what was pending."""
        to_fire = []
        with self._lock:
            live = self.enabled and not self.function_masked
            for vector in range(self.vectors):
                address, data, masked = self.entry(vector)
                if live and not masked:
                    self._route(vector, address, data)
                    if self._pending[vector]:
                        self._pending[vector] = False
                        to_fire.append(vector)
        for vector in to_fire:
            self._fire(vector)

    def _route(self, vector: int, address: int, data: int) -> None:
        if self._routing is None:
            return
        try:
            self._routing.set_msi(self._lines[vector].gsi, address, data)
        except InterruptRoutingError:
            # Guest-chosen garbage KVM will not route: the vector keeps its old route
            # (or none). Counted, never raised into the vCPU that wrote the table.
            self.refused_routes += 1

    def _control_written(self, offset: int, size: int) -> None:
        self._deliver_unmasked()
        self._changed()

    # --- the guest's side: table and PBA accesses in the BAR -------------------------------
    def read(self, offset: int, size: int) -> int:
        """Table read at ``offset`` within the table."""
        if offset < 0 or offset + size > len(self._table):
            return 0
        with self._lock:
            return int.from_bytes(self._table[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self._table):
            return
        vector = offset // ENTRY_SIZE
        if (offset + size - 1) // ENTRY_SIZE != vector:
            return  # an access across two entries is undefined: ignore it
        with self._lock:
            self._table[offset:offset + size] = value.to_bytes(size, "little")
        self._entry_written(vector)
        self._changed()

    def _entry_written(self, vector: int) -> None:
        address, data, masked = self.entry(vector)
        if masked:
            return
        fire = False
        with self._lock:
            if self.enabled and not self.function_masked:
                self._route(vector, address, data)
                fire, self._pending[vector] = self._pending[vector], False
        if fire:
            self._fire(vector)

    def read_pba(self, offset: int, size: int) -> int:
        value = 0
        with self._lock:
            for bit in range(8 * size):
                vector = 8 * offset + bit
                if 0 <= vector < self.vectors and self._pending[vector]:
                    value |= 1 << bit
        return value

    @property
    def table_size(self) -> int:
        return len(self._table)

    @property
    def pba_size(self) -> int:
        return (self.vectors + 63) // 64 * 8

    def table_device(self) -> Device:
        return self

    def pba_device(self) -> Device:
        return _PbaView(self)

    def close(self) -> None:
        if self._routing is not None:
            for line in self._lines:
                line.close()
                self._routing.release_msi_gsi(line.gsi)
            self._routing = None


class _PbaView(Device):
    """The PBA: read-only pending bits (writes are ignored, as the spec allows)."""

    name = "msix-pba"

    def __init__(self, table: MsixTable):
        self._table = table

    def read(self, offset: int, size: int) -> int:
        return self._table.read_pba(offset, size)
