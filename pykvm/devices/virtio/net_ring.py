"""virtio-net's per-frame fast path: runs of one-descriptor frames taken straight off
the split ring (virtio 1.2 sections 2.7.6-2.7.8), one system call each.

Why a module of its own: a frame costs the TAP one writev() or readv() (~1.3-1.7 us
here); going through ``Virtqueue.pop``/``add_used`` and the device's general loop
cost as much again in Python (a DescriptorChain and two lists per frame, two method
calls, the used index stored per frame). bench/RESULTS.md ("Issue #13, per-frame
pass") has the breakdown. The loops below serve the case nearly every frame is in --
a transmit chain of one device-readable descriptor holding header and frame, a
receive chain of one device-writable descriptor big enough for any frame -- with the
ring's own views (``Virtqueue.ring_views``, ended by ``Virtqueue.publish``), locals only, the avail
index read once per run of frames and the used index stored once per run (the
driver is interrupted only after the pass anyway, poll.py).

Every check ``Virtqueue.pop`` makes on such a chain is made here too, on the one
read of each avail entry and descriptor: the avail index at most the queue size
ahead, the head below the queue size, the buffer wholly inside guest RAM (the
first region, where nearly every buffer is). Anything else -- a chain of several
descriptors or an indirect one, a buffer in another RAM region, a frame too short
or too long, a receive buffer too small, an avail index too far ahead, a head out
of range -- ends the run *before* that entry is consumed: the caller then takes it
with ``Virtqueue.pop``, which reads it afresh and applies every rule (or raises
VirtqueueError). So this path is never the only check, and never a skipped one.
"""

from __future__ import annotations

import struct

from .net_spec import MAX_GSO_FRAME, NET_HDR_SIZE, NUM_BUFFERS_OFFSET
from .queue import DESC_F_WRITE, Virtqueue
from ...net.wire import WireBusy

_DESCRIPTOR = struct.Struct("<QIHH")      # addr, len, flags, next (section 2.7.5)
_UNPACK = _DESCRIPTOR.unpack_from

# How a run ended.
DONE = 0         # the budget is spent
EMPTY = 1        # the driver has offered nothing more
SLOW = 2         # the next entry is not a one-descriptor frame: Virtqueue.pop takes it
DRAINED = 3      # receive: the wire has no more frames (readv: EAGAIN)
BUSY = 4         # transmit: the wire took a frame but wants to drain (WireBusy)


class RunResult:
    """What a run did: ``frames`` moved (``octets`` with their headers), ``errors``
    (transmit: frames the wire refused) or frames dropped as too long (receive), and
    how it ended (``outcome``)."""

    __slots__ = ("frames", "octets", "errors", "outcome")

    def __init__(self, frames: int, octets: int, errors: int, outcome: int):
        self.frames, self.octets, self.errors, self.outcome = frames, octets, errors, outcome


def transmit_run(queue: Virtqueue, send_frame, budget: int) -> RunResult:
    """Send up to ``budget`` one-descriptor frames of ``queue`` with ``send_frame(view)``
    (the wire's), returning each with length 0 (section 5.1.6.2: the device writes
    nothing). A frame the wire refuses (OSError) is returned too and counted in
    ``errors``."""
    return _run(queue, send_frame, budget, False, NET_HDR_SIZE, MAX_GSO_FRAME)


def receive_run(queue: Virtqueue, recv_frame, budget: int, min_buffer: int) -> RunResult:
    """Read up to ``budget`` frames with ``recv_frame(view)`` (the wire's), each into
    the next chain of one device-writable buffer of at least ``min_buffer`` bytes --
    longer than any frame the MTU allows -- and return it with the frame's length and
    num_buffers 1. A frame that fills the buffer is too long (the read may have cut
    it; virtio 1.2 section 5.1.6.3.2: no frame beyond the MTU for the driver):
    dropped and counted in ``errors``, its buffer used for the next."""
    return _run(queue, recv_frame, budget, True, min_buffer, 0xFFFFFFFF)


def _run(queue: Virtqueue, move_frame, budget: int, receive: bool, shortest: int,
         longest: int) -> RunResult:
    """One loop for both directions (a call per frame is what this module saves, so the
    direction is a branch, not a function): take entries while each is one descriptor
    of the direction's kind (device-writable for receive), ``shortest`` to ``longest``
    bytes, wholly in the first RAM region; move a frame through it with
    ``move_frame``; write its used element; store the used index once at the end."""
    if not queue.active:
        return RunResult(0, 0, 0, EMPTY)
    size, avail_idx, avail_ring, table, used_ring, low, high, ram = queue.ring_views()
    position, used = queue.last_avail_idx, queue.used_idx
    mask, slots, start = size - 1, 2 * size - 1, position
    slot = (used & mask) << 1        # the next used element: (id, len) at slot, slot + 1
    kind = DESC_F_WRITE if receive else 0
    octets = errors = 0
    outcome = DONE
    end = position      # no entry read yet: the first pass of the loop reads the index
    try:
        for _ in range(budget):
            if position == end:
                end, outcome = _available(avail_idx, position, size)
                if outcome != DONE:
                    break
            head = avail_ring[position & mask]
            if head >= size:
                outcome = SLOW
                break
            addr, length, flags, _ = _UNPACK(table, head << 4)
            if flags != kind or addr < low or addr + length > high \
                    or length < shortest or length > longest:
                outcome = SLOW
                break
            view = ram[addr - low:addr - low + length]
            if receive:
                try:
                    got = move_frame(view)
                except OSError:
                    outcome = SLOW              # the general path retries or gives up
                    break
                if got is None:
                    outcome = DRAINED
                    break
                if got >= length:
                    errors += 1                 # too long: the buffer is reused
                    continue
                # num_buffers (u16 at offset 10): the TAP leaves the header's last 2 bytes
                view[NUM_BUFFERS_OFFSET] = 1
                view[NUM_BUFFERS_OFFSET + 1] = 0
                position += 1
                used_ring[slot] = head
                used_ring[slot + 1] = got
                slot = (slot + 2) & slots
                octets += got
                continue
            position += 1
            used_ring[slot] = head
            used_ring[slot + 1] = 0
            slot = (slot + 2) & slots
            try:
                move_frame(view)
            except OSError:
                errors += 1                 # the kernel refused it
                continue
            except WireBusy:                # taken; the wire's watcher kicks us
                octets += length
                outcome = BUSY
                break
            octets += length
    finally:
        queue.publish(position, used + position - start)
    frames = position - start - (0 if receive else errors)
    return RunResult(frames, octets, errors, outcome)


def _available(avail_idx: memoryview, position: int, size: int) -> tuple[int, int]:
    """(where the entries the driver has made available end, DONE), or why a run
    stops there: EMPTY, or SLOW for an index more than the queue size ahead (pop
    raises the VirtqueueError)."""
    pending = (avail_idx[0] - position) & 0xFFFF
    if pending == 0:
        return position, EMPTY
    if pending > size:
        return position, SLOW
    return position + pending, DONE
