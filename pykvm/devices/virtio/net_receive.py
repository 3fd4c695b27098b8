"""virtio-net's receive path (virtio 1.2 section 5.1.6.3, "Setting Up Receive
Buffers", and 5.1.6.4, "Processing of Incoming Packets"): frames from the wire into
the buffers the guest offers on receiveq.

Why a module of its own: receive is the half of pykvm/devices/virtio/net.py with
rules of its own -- which buffers one frame may take, with and without
VIRTIO_NET_F_MRG_RXBUF, and the bound on the descriptors one frame uses.
:class:`NetReceive` is a mixin of :class:`~pykvm.devices.virtio.net.NetDevice`
(its state lives there).

The rules. Every frame starts with the 12-byte header; the wire (a TAP) writes it,
the device only fills in num_buffers (5.1.6.4: the number of used elements the frame
took). A frame longer than the largest the negotiated features allow -- the host
raised the TAP's MTU, say -- is dropped and counted (a spare byte after the room
shows it: the kernel truncates silently); the buffers are reused.

- Without VIRTIO_NET_F_MRG_RXBUF each frame takes one chain (5.1.6.3.1: the
  driver's "big" buffers when it asked for TSO) and is readv() straight into it;
  a chain of more descriptors than one readv() takes (IOV_MAX) is returned unused
  (length 0), as a malformed buffer the driver drops (section 2.7.4.1: "the device
  MAY have a reasonable limit of descriptors it will allow in a chain"; 2.7.4
  names IOV_MAX as such a limit).
- With VIRTIO_NET_F_MRG_RXBUF a frame may spread over several chains, each its
  own used element, num_buffers counting them (5.1.6.4). Linux offers ~1.5 KiB
  buffers and, with GUEST_TSO4/6, may be sent 64 KiB frames: reading straight into
  buffers for the largest frame meant holding ~43 chains and a readv() of ~43
  iovecs per 1500-byte frame (twice the fast path's cost, bench/RESULTS.md, "Issue
  #13, per-frame pass"). So the frame is read once into the device's bounce buffer
  (the largest frame plus the spare byte: one per NIC, sized at negotiation), then
  copied into only as many chains as it takes, popped as it needs them. A frame
  the guest has too few buffers for waits in the bounce buffer -- at most that one
  frame: nothing more is read until it is placed. One frame uses at most
  IOV_MAX descriptors, as before: a chain that would pass the bound waits for the
  next frame and the frame is dropped as too long for the buffers held; a chain
  that alone has more is returned unused.

Either way the device reads a frame only while it holds a validated chain for it
(popped before the read, so a hostile chain is found with no frame waiting); until
the guest offers one, frames wait in the TAP's queue, and the kernel drops beyond
it, as a full NIC would. A guest's odd buffers cost it frames, never the NIC.
Runs of one-descriptor chains longer than any frame take net_ring.receive_run's
per-frame fast path instead (one read() straight into each); every other chain
goes through ``Virtqueue.pop``.
"""

from __future__ import annotations

import errno
import os
import struct

from .net_ring import DONE, DRAINED, receive_run
from .net_spec import NET_HDR_SIZE, NUM_BUFFERS_OFFSET, RECEIVE_QUEUE
from .queue import Virtqueue, VirtqueueError, scatter, slice_views

RX_BATCH = 128                  # frames per worker turn before the other queue gets one
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024   # iovecs per readv()

_U16 = struct.Struct("<H")

# What placing a bounced frame came to (NetReceive._place).
PLACED, WAIT, DROPPED = 0, 1, 2


def _set_num_buffers(views: list[memoryview], count: int) -> None:
    """num_buffers into the first chain's header (section 5.1.6.4), written after the
    frame; a driver may have split the header over descriptors."""
    if len(views[0]) >= NET_HDR_SIZE:
        _U16.pack_into(views[0], NUM_BUFFERS_OFFSET, count)
    else:
        scatter(slice_views(views, NUM_BUFFERS_OFFSET, 2), _U16.pack(count))


class NetReceive:
    """The receive queue's half of :class:`~pykvm.devices.virtio.net.NetDevice`: runs on
    the transport's queue worker."""

    def _receive(self, queue: Virtqueue) -> None:
        self._rx_wants_more = False
        if self._broken_backend:
            return
        recv_into, recv_frame = self.wire.recv_into, self.wire.recv_frame
        frames = octets = too_long = 0
        rx_throttle = self.rx_throttle if self.rx_throttle.limiter is not None else None
        mergeable, bounce, pending = self._mergeable, self._bounce, self._pending
        # net_ring.receive_run takes one-buffer chains longer than any frame (a frame
        # that fills one is too long); it runs only while the general path below
        # holds nothing of its own, and not again in a pass once it met a chain it
        # does not take (a Linux driver's mergeable buffers: every chain would be).
        fast, min_buffer = rx_throttle is None, self._rx_target + 1
        try:
            reads = 0
            while reads < RX_BATCH:
                if fast and not self._pending and self._held is None \
                        and not self._injected and not self._bounced:
                    run = receive_run(queue, recv_frame, RX_BATCH - reads, min_buffer)
                    reads += run.frames + run.errors
                    frames += run.frames
                    octets += run.octets
                    too_long += run.errors
                    if run.outcome == DRAINED:
                        self.wire.arm()          # drained: wake us when the wire has more
                        return
                    if run.outcome == DONE:
                        break
                    fast = False                 # EMPTY, SLOW: the general path takes it
                reads += 1
                if not pending and not self._take_buffer(queue):
                    self._rx_wants_more = True   # out of buffers: the guest's notify resumes us
                    self.stats["rx_waits_for_buffers"] += 1
                    return
                length = self._bounced if mergeable else 0
                if length:
                    pass                         # the frame that waited for buffers
                elif self._injected:             # an in-VMM service's reply (MMDS)
                    reply = self._injected.popleft()
                    length = NET_HDR_SIZE + len(reply)
                    if length > (len(bounce) - 1 if mergeable else self._rx_capacity):
                        continue                 # does not fit: dropped
                    if mergeable:
                        bounce[:NET_HDR_SIZE] = bytes(NET_HDR_SIZE)
                        bounce[NET_HDR_SIZE:length] = reply
                    else:
                        scatter(self._rx_views, bytes(NET_HDR_SIZE) + reply)
                else:
                    if rx_throttle is not None and not rx_throttle.admit():
                        return                   # the throttle's wake-up kicks us
                    try:
                        length = recv_frame(bounce) if mergeable else recv_into(self._rx_views)
                    except BlockingIOError:
                        length = None
                    except OSError as error:
                        if error.errno == errno.EINTR:
                            continue
                        self._backend_failed(error)
                        return
                    if length is None:
                        self.wire.arm()          # drained: wake us when the wire has more
                        return
                    if length > (len(bounce) - 1 if mergeable else self._rx_capacity):
                        too_long += 1            # reached the spare byte: buffers reused
                        continue
                    if rx_throttle is not None:
                        rx_throttle.charge(length - NET_HDR_SIZE)
                if not mergeable:
                    self._complete(queue, length)
                else:
                    placed = self._place(queue, length)
                    if placed == WAIT:
                        self._bounced = length   # the one frame that waits
                        self._rx_wants_more = True   # the guest's notify resumes us
                        self.stats["rx_waits_for_buffers"] += 1
                        return
                    self._bounced = 0
                    if placed == DROPPED:
                        too_long += 1
                        continue
                frames += 1
                octets += length
            self.kick(RECEIVE_QUEUE)             # batch done: come back after the other queue
        finally:
            self.stats["rx_frames"] += frames
            self.stats["rx_bytes"] += octets - NET_HDR_SIZE * frames
            if too_long:
                self.stats["rx_dropped_too_long"] += too_long

    def give_back_held_chains(self, queues: list[Virtqueue]) -> None:
        """Before a snapshot: the receive chains held for the next frame (popped, not
        used: one after every pass that drained the wire) go back to the avail side.
        They are the receive queue's latest pops, in order (a pass uses what it holds
        oldest first, and the fast path runs only while nothing is held), so moving
        last_avail_idx back by their count offers them again, to this device after
        the snapshot and to the restored one; without it each snapshot cost the guest
        those buffers for good. A frame waiting in the bounce buffer stays for this
        device (a snapshot does not keep it: the restored NIC lost a frame)."""
        held = len(self._pending) + (self._held is not None)
        if not held:
            return
        queue = queues[RECEIVE_QUEUE]
        queue.last_avail_idx = (queue.last_avail_idx - held) & 0xFFFF
        self._pending.clear()
        self._held = None
        self._rx_views = [self._spill]
        self._rx_capacity = 0

    def _backend_failed(self, error: OSError) -> None:
        self._broken_backend = True
        self._note(f"reading the {'TAP' if self.tap else 'wire'} failed: "
                   f"{error.strerror}; receive stopped")

    def _next_chain(self, queue: Virtqueue) -> tuple | None:
        """The chain held back for this frame, else the next one popped, after a
        receive chain's rules (only device-writable buffers, room for at least the
        header: VirtqueueError if not): (chain, bytes it holds, descriptors), or None
        if the guest has offered no more."""
        if self._held is not None:
            entry, self._held = self._held, None
            return entry
        chain = queue.pop()
        if chain is None:
            return None
        if chain.readable:
            raise VirtqueueError(f"receive chain {chain.head} has device-readable buffers")
        writable = chain.writable
        count = len(writable)
        capacity = len(writable[0]) if count == 1 else sum(map(len, writable))
        if capacity < NET_HDR_SIZE:
            raise VirtqueueError(f"receive chain {chain.head} of {capacity} bytes "
                                 f"cannot hold the {NET_HDR_SIZE}-byte header")
        return chain, capacity, count

    def _take_buffer(self, queue: Virtqueue) -> bool:
        """Hold the next receive chain, the next frame's first (without MRG_RXBUF its
        only: its buffers, then the spare byte, are the readv() target); False if
        the guest has offered none."""
        while True:
            entry = self._next_chain(queue)
            if entry is None:
                return False
            chain, capacity, count = entry
            if count + 1 > IOV_MAX:              # with the spare byte: one readv()'s bound
                queue.add_used(chain.head, 0)    # more buffers than one frame may use
                self.stats["rx_chains_too_fragmented"] += 1
                continue
            self._pending.append(entry)
            self._rx_capacity = capacity
            if not self._mergeable:
                self._rx_views[-1:-1] = chain.writable
            return True

    # --- with MRG_RXBUF: a frame read into the bounce buffer, copied into chains -------------
    def _place(self, queue: Virtqueue, length: int) -> int:
        """Copy the bounced frame (``length`` bytes, header included) into as many
        chains as it takes -- the held one first, more popped as needed: PLACED, WAIT
        (too few buffers yet: the frame stays bounced, the chains stay held) or
        DROPPED (it would pass the IOV_MAX descriptors bound: too long for the
        buffers; they are kept for the next frame)."""
        bounce, pending = self._bounce, self._pending
        chain, capacity, count = pending[0]
        if count == 1 and capacity >= length and len(pending) == 1:
            view = chain.writable[0]             # the common case: one buffer holds it
            view[:length] = bounce[:length]
            _U16.pack_into(view, NUM_BUFFERS_OFFSET, 1)   # after the frame (5.1.6.4)
            queue.add_used(chain.head, length)
            pending.clear()
            self._rx_capacity = 0
            return PLACED
        capacity = self._rx_capacity
        descriptors = sum(count for _, _, count in pending)
        while capacity < length:
            entry = self._next_chain(queue)
            if entry is None:
                self._rx_capacity = capacity
                return WAIT
            if descriptors + entry[2] > IOV_MAX:
                self._held = entry               # the next frame's
                self._rx_capacity = capacity
                return DROPPED
            pending.append(entry)
            capacity += entry[1]
            descriptors += entry[2]
        done, taken = 0, []
        while True:                              # at least one chain, even for no bytes
            chain, size, _ = pending.popleft()
            capacity -= size
            start = done
            for view in chain.writable:
                piece = min(len(view), length - done)
                view[:piece] = bounce[done:done + piece]
                done += piece
                if done >= length:
                    break
            taken.append((chain, done - start))
            if done >= length:
                break
        self._rx_capacity = capacity
        _set_num_buffers(taken[0][0].writable, len(taken))
        for chain, written in taken:
            queue.add_used(chain.head, written)
        return PLACED

    # --- without MRG_RXBUF: one chain per frame, readv() straight into it --------------------
    def _complete(self, queue: Virtqueue, length: int) -> None:
        """``length`` bytes landed in the pending chain: num_buffers 1, then hand it to
        the guest."""
        chain, _, count = self._pending.popleft()
        _set_num_buffers(chain.writable, 1)
        queue.add_used(chain.head, length)
        self._rx_capacity = 0
        del self._rx_views[:count]
