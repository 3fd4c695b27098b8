"""The split virtqueue (virtio 1.x, section 2.7), seen from the device, with the
guest treated as hostile.

Every number the guest supplies is checked before it is used: the ring areas
and every buffer must lie inside guest RAM (GuestMemory's bounds check), a
descriptor index must be below the queue size, a chain (counting the entries
of an indirect table) can be at most queue-size long, so a loop ends as an
error, an indirect table must be a whole number of descriptors, not nested,
and only used when negotiated, and device-writable buffers come after the
readable ones. The avail index may run ahead of the device by at most the
queue size. A violation raises :class:`VirtqueueError`; the transport turns it
into DEVICE_NEEDS_RESET. Nothing is read twice: a descriptor is unpacked once,
so the guest cannot change it between check and use.

Buffers are handed to the device as memoryviews of guest RAM (zero-copy), the
used ring is written straight into guest memory, and with
VIRTIO_F_RING_EVENT_IDX the device both publishes avail_event (to be notified
only when it is idle) and honours used_event (to interrupt only when asked).

Ring layout (queue size N): descriptor table 16*N bytes (addr u64, len u32,
flags u16, next u16), 16-byte aligned; avail ring: flags u16, idx u16,
ring[N] u16, used_event u16, 2-byte aligned; used ring: flags u16, idx u16,
ring[N] of (id u32, len u32), avail_event u16, 4-byte aligned.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

from ...errors import GuestMemoryError, PykvmError
from ...memory import GuestMemory
from .state import QueueState
# The buffer helpers lived here; devices and tests still import them from this module.
from .buffers import (MAX_STREAM_PER_CHAIN, STREAM_CHUNK, StreamCount,  # noqa: F401
                      gather, scatter, slice_views, stream_readable)

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
DESCRIPTOR_SIZE = 16
MAX_QUEUE_SIZE = 32768

_DESCRIPTOR = struct.Struct("<QIHH")
_unpack_descriptor = _DESCRIPTOR.unpack_from


class VirtqueueError(PykvmError):
    """The guest broke the virtqueue rules (bad address, index, length or chain)."""


_fence_lock = threading.Lock()


def full_barrier() -> None:
    """A store-load fence between the device's ring writes and its next ring read.
    x86 keeps stores in order and loads in order, but may let a load pass an
    earlier store; taking a lock executes a locked instruction, a full fence."""
    with _fence_lock:
        pass


@dataclass(slots=True)
class DescriptorChain:
    """One request: its head index and its buffers as views of guest RAM."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(map(len, self.readable))

    @property
    def writable_len(self) -> int:
        return sum(map(len, self.writable))


class RingViews(NamedTuple):
    """An active queue's ring areas and guest RAM's first region, for a device's own
    per-frame loop that reads and checks entries itself (virtio-net's net_ring.py):
    the views ``activate`` took, valid until the queue is reset."""

    size: int
    avail_idx: memoryview       # 16-bit, the driver's next avail index
    avail_ring: memoryview      # 16-bit heads
    descriptors: memoryview     # the table's bytes (section 2.7.5: 16 a descriptor)
    used_ring: memoryview       # 32-bit (id, len) pairs
    ram_start: int              # guest RAM's first region: [ram_start, ram_end)
    ram_end: int
    ram: memoryview


class Virtqueue:
    """Registers the driver programs (size, ring addresses, enable, MSI-X vector)
    and the device's ring state once the queue is activated."""

    def __init__(self, memory: GuestMemory, max_size: int):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise PykvmError(f"virtqueue size {max_size} is not a power of two up to 32768")
        self.memory = memory
        self.max_size = max_size
        self.indirect_allowed = False
        self.event_idx = False
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.enabled = False
        self.msix_vector = 0xFFFF
        self.active = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self._signalled_used = 0
        self._desc = self._avail = self._used = self._used_ring = self._avail_ring = None
        self._ram: tuple[tuple[int, int, memoryview], ...] = ()

    # --- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> QueueState:
        return QueueState(self.size, self.desc_addr, self.avail_addr, self.used_addr,
                          self.enabled, self.msix_vector, self.active, self.last_avail_idx,
                          self.used_idx, self._signalled_used, self.indirect_allowed,
                          self.event_idx)

    def restore_state(self, state: QueueState) -> None:
        """Onto a reset queue; an active queue is activated again (its ring views then
        point into this VM's RAM), with the saved indices. VirtqueueError if the saved
        registers do not make a valid queue."""
        self.reset()
        self.size = state.size
        self.desc_addr, self.avail_addr, self.used_addr = \
            state.desc_addr, state.avail_addr, state.used_addr
        self.enabled = state.enabled
        self.msix_vector = state.msix_vector
        if state.active:
            self.activate(indirect=state.indirect, event_idx=state.event_idx)
            self.last_avail_idx = state.last_avail_idx
            self.used_idx = state.used_idx
            self._signalled_used = state.signalled_used

    # --- activation ------------------------------------------------------------------------
    def check_registers(self) -> None:
        """VirtqueueError unless the driver's size and ring addresses make a queue
        (2.7: a power-of-two size, aligned areas, each wholly in guest RAM)."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two up to {self.max_size}")
        for name, addr, align, length in (
                ("descriptor table", self.desc_addr, 16, DESCRIPTOR_SIZE * size),
                ("avail ring", self.avail_addr, 2, 6 + 2 * size),
                ("used ring", self.used_addr, 4, 6 + 8 * size)):
            if addr % align:
                raise VirtqueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
            self._area(addr, length, name)

    def activate(self, *, indirect: bool, event_idx: bool) -> None:
        """Check the driver's registers and take views of the three ring areas."""
        self.check_registers()
        size = self.size
        self._desc = self._area(self.desc_addr, DESCRIPTOR_SIZE * size, "descriptor table")
        self._avail = self._area(self.avail_addr, 6 + 2 * size, "avail ring")
        self._used = self._area(self.used_addr, 6 + 8 * size, "used ring")
        # The indexes the guest reads while the device writes them (and the other way
        # round) go through 16-bit views: one load or store each. struct's pack_into
        # clears the bytes first and then writes them one by one, so a guest reading at
        # that moment would see a torn index (bench/net.py saw thousands).
        self._avail_flags = _u16_view(self._avail, 0)
        self._avail_idx = _u16_view(self._avail, 2)
        self._used_event = _u16_view(self._avail, 4 + 2 * size)
        self._used_flags = _u16_view(self._used, 0)
        self._used_idx = _u16_view(self._used, 2)
        self._avail_event = _u16_view(self._used, 4 + 8 * size)
        # The used elements as (id, len) pairs of 32-bit words: one store per field,
        # never the clear-then-bytes of struct.pack_into.
        self._used_ring = self._used[4:4 + 8 * size].cast("I")
        self._avail_ring = self._avail[4:4 + 2 * size].cast("H")
        # Guest RAM as (start, end, view) per region, for the chain walk's bounds
        # check without a call per buffer (GuestMemory.view's check, inlined).
        self._ram = tuple((r.guest_addr, r.end, r.view) for r in self.memory.regions)
        self.indirect_allowed = indirect
        self.event_idx = event_idx
        self.last_avail_idx = 0
        self.used_idx = 0
        self._signalled_used = 0
        self.active = True

    def _area(self, addr: int, length: int, what: str) -> memoryview:
        try:
            return self.memory.view(addr, length)
        except GuestMemoryError:
            raise VirtqueueError(f"{what} at {addr:#x}+{length:#x} is outside guest RAM") from None

    def _buffer(self, addr: int, length: int) -> memoryview:
        try:
            return self.memory.view(addr, length)
        except GuestMemoryError:
            raise VirtqueueError(f"buffer {addr:#x}+{length:#x} is outside guest RAM") from None

    # --- the avail side ----------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self._avail_idx[0]

    def has_available(self) -> bool:
        return self.active and self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has offered nothing new.

        Every rule in the module docstring is checked here, on the one copy of each
        descriptor it reads. This is the hot path of every request (a 4 KiB read at
        queue depth 32 spends about a third of its Python here), so it is one function:
        locals only, the RAM bounds check inlined with the first region (where nearly
        every buffer is) tried first, no call per descriptor."""
        if not self.active:
            return None
        last, size = self.last_avail_idx, self.size
        avail_idx = self._avail_idx[0]
        pending = (avail_idx - last) & 0xFFFF
        if pending == 0:
            return None
        if pending > size:
            raise VirtqueueError(f"avail index {avail_idx} is {pending} ahead of the device's "
                                 f"{last} (queue size {size})")
        head = self._avail_ring[last & (size - 1)]
        self.last_avail_idx = (last + 1) & 0xFFFF
        if head >= size:
            raise VirtqueueError(f"descriptor index {head} is out of range (table of {size})")
        table = self._desc
        addr, length, flags, index = _unpack_descriptor(table, DESCRIPTOR_SIZE * head)
        ram = self._ram
        low, high, low_view = ram[0]
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table_size, budget, indirect = size, size - 1, False   # the head is one of the table's
        while True:
            if flags & DESC_F_INDIRECT:
                table = self._indirect_table(addr, length, flags, indirect)
                table_size = budget = length // DESCRIPTOR_SIZE
                index, indirect = 0, True
            else:
                if low <= addr and addr + length <= high:
                    view = low_view[addr - low:addr - low + length]
                else:
                    for start, end, region in ram:
                        if start <= addr and addr + length <= end:
                            view = region[addr - start:addr - start + length]
                            break
                    else:
                        raise VirtqueueError(f"buffer {addr:#x}+{length:#x} is outside guest RAM")
                if flags & DESC_F_WRITE:
                    writable.append(view)
                elif writable:
                    raise VirtqueueError(f"chain from head {head} has a readable buffer after a "
                                         f"writable one")
                else:
                    readable.append(view)
                if not flags & DESC_F_NEXT:
                    return DescriptorChain(head, readable, writable)
            if index >= table_size:
                raise VirtqueueError(f"descriptor index {index} is out of range "
                                     f"(table of {table_size})")
            if budget == 0:
                raise VirtqueueError(f"chain from head {head} is longer than its table "
                                     f"({table_size} descriptors): a loop?")
            budget -= 1
            addr, length, flags, index = _unpack_descriptor(table, DESCRIPTOR_SIZE * index)

    def _indirect_table(self, addr: int, length: int, flags: int, nested: bool) -> memoryview:
        """The view of an indirect table, after its rules (virtio 1.2 section 2.7.5.3)."""
        if nested:
            raise VirtqueueError("an indirect table points to another indirect table")
        if not self.indirect_allowed:
            raise VirtqueueError("indirect descriptor, but INDIRECT_DESC was not negotiated")
        if flags & DESC_F_NEXT:
            raise VirtqueueError("indirect descriptor with NEXT set")
        if length == 0 or length % DESCRIPTOR_SIZE or length // DESCRIPTOR_SIZE > self.size:
            raise VirtqueueError(f"indirect table of {length} bytes is not 1..{self.size} "
                                 f"descriptors")
        # Linux puts every request of more than one buffer in an indirect table when
        # INDIRECT_DESC is negotiated: the RAM check inlined as the walk does (-0.25 µs).
        low, high, view = self._ram[0]
        if low <= addr and addr + length <= high:
            return view[addr - low:addr - low + length]
        return self._buffer(addr, length)

    def ring_views(self) -> RingViews:
        """The active queue's views for a loop that takes entries itself; it must make
        every check ``pop`` makes on what it takes, leave anything else to ``pop``, and
        end with :meth:`publish`."""
        start, end, ram = self._ram[0]
        return RingViews(self.size, self._avail_idx, self._avail_ring, self._desc,
                         self._used_ring, start, end, ram)

    def publish(self, last_avail_idx: int, used_idx: int) -> None:
        """After such a loop: entries up to ``last_avail_idx`` are consumed and the used
        elements up to ``used_idx`` written; store the used index once, after them
        (section 2.7.8.2, as :meth:`add_used` does)."""
        self.last_avail_idx = last_avail_idx & 0xFFFF
        used_idx &= 0xFFFF
        if used_idx != self.used_idx:
            self.used_idx = used_idx
            self._used_idx[0] = used_idx

    # --- the used side -------------------------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, saying ``written`` bytes were written to it.

        Publication (virtio 1.2 section 2.7.8.2): the element is written first, with
        one 32-bit store per field, then the index with one 16-bit store. x86 makes
        stores visible in program order (TSO), so a driver that sees the new index
        sees the whole element; nothing else writes this ring, and only one thread
        at a time serves a queue (the transport's lock), so the index never goes
        back. tests/kvm/test_hostile_guest.py watches it from a guest vCPU."""
        slot = 2 * (self.used_idx & (self.size - 1))
        ring = self._used_ring
        ring[slot] = head
        ring[slot + 1] = written if written <= 0xFFFFFFFF else 0xFFFFFFFF   # len is a u32
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_idx[0] = self.used_idx

    def should_interrupt(self) -> bool:
        """After adding used buffers: does the driver want an interrupt for them?"""
        full_barrier()   # our used-idx store must precede the load of used_event/flags
        new, old = self.used_idx, self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        if self.event_idx:
            return need_event(self._used_event[0], new, old)
        return not self._avail_flags[0] & AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> bool:
        """Before the device sleeps: ask to be notified of new buffers; True if some
        arrived meanwhile (then process them instead of sleeping: a buffer published
        while notifications were suppressed came without a notify)."""
        if not self.active:
            return False
        if self.event_idx:
            self._avail_event[0] = self.last_avail_idx
        elif self._used_flags[0]:
            self._used_flags[0] = 0
        full_barrier()   # avail_event store before the avail idx load, or a kick is lost
        return self.avail_idx() != self.last_avail_idx

    def suppress_notification(self) -> None:
        """While the device polls the ring (poll.py): the driver need not notify
        (virtio 1.2 section 2.7.10). With EVENT_IDX, avail_event one behind the
        device's index: the driver notifies when its new index passes avail_event
        coming from its old one, and its old index is never behind the device's, so
        that never happens (until :meth:`enable_notification`); without it,
        VIRTQ_USED_F_NO_NOTIFY. Only a hint to the driver: nothing relies on it."""
        if not self.active:
            return
        if self.event_idx:
            self._avail_event[0] = (self.last_avail_idx - 1) & 0xFFFF
        else:
            self._used_flags[0] = USED_F_NO_NOTIFY


def _u16_view(area: memoryview, offset: int) -> memoryview:
    return area[offset:offset + 2].cast("H")


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did the index move past ``event`` going old -> new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
