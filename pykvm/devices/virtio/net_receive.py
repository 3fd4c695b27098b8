"""virtio-net's receive path (virtio 1.2 section 5.1.6.3, "Setting Up Receive
Buffers", and 5.1.6.4, "Processing of Incoming Packets"): frames from the wire into
the buffers the guest offers on receiveq.

Why a module of its own: receive is the half of pykvm/devices/virtio/net.py with
rules of its own -- which buffers one frame may take, with and without
VIRTIO_NET_F_MRG_RXBUF, and the bound one readv() puts on them. :class:`NetReceive`
is a mixin of :class:`~pykvm.devices.virtio.net.NetDevice` (its state lives there).

The rules: readv() from the TAP lands straight in the guest's receive buffers;
the device only fills in num_buffers. With VIRTIO_NET_F_MRG_RXBUF a frame may
spread over several buffers (each its own used element; num_buffers counts
them); without it each frame takes one chain (the driver's "big" buffers
when it asked for TSO). The device reads only once it holds buffers for the
largest frame the negotiated features allow; until the guest offers that
much, frames wait in the TAP's queue (and the kernel drops beyond it, as a
full NIC would). A frame longer than the buffers -- the host raised the TAP's
MTU, say -- is dropped and counted (a spare host byte after the buffers shows
it: the kernel truncates silently); the buffers are reused.
One readv() takes at most IOV_MAX buffers, so the device never holds more
descriptors than that for one frame: a receive chain that would pass the
bound waits for the next frame (the frame is read into the buffers already
held, a longer one is dropped as too long), and a chain that alone has more
is returned unused (length 0), as a malformed buffer the driver drops
(virtio 1.2 section 2.7.4.1: "the device MAY have a reasonable limit of
descriptors it will allow in a chain"; 2.7.4 names IOV_MAX as such a limit).
A guest's odd buffers cost it frames, never the NIC.
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


def _set_num_buffers(views: list[memoryview], count: int) -> None:
    """num_buffers into a header that a driver split over descriptors."""
    scatter(slice_views(views, NUM_BUFFERS_OFFSET, 2), _U16.pack(count))


class NetReceive:
    """The receive queue's half of :class:`~pykvm.devices.virtio.net.NetDevice`: runs on
    the transport's queue worker."""

    def _receive(self, queue: Virtqueue) -> None:
        self._rx_wants_more = False
        if self._broken_backend:
            return
        recv_into, complete = self.wire.recv_into, self._complete
        frames = octets = too_long = 0
        rx_throttle = self.rx_throttle if self.rx_throttle.limiter is not None else None
        # net_ring.receive_run takes one-buffer chains longer than any frame (a frame
        # that fills one is too long); it runs only while the general path below
        # holds no buffers of its own.
        recv_frame, min_buffer = self.wire.recv_frame, self._rx_target + 1
        try:
            reads = 0
            while reads < RX_BATCH:
                if rx_throttle is None and not self._pending and self._held is None \
                        and not self._injected:
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
                    # EMPTY, SLOW: the general path takes the next chain (or waits)
                reads += 1
                if self._rx_capacity < self._rx_target and not self._take_buffers(queue):
                    self._rx_wants_more = True   # out of buffers: the guest's notify resumes us
                    self.stats["rx_waits_for_buffers"] += 1
                    return
                if self._injected:               # an in-VMM service's reply (MMDS)
                    length = NET_HDR_SIZE + len(self._injected[0])
                    if length <= self._rx_capacity:
                        scatter(self._rx_views, bytes(NET_HDR_SIZE) + self._injected[0])
                        complete(queue, length)
                        frames += 1
                        octets += length
                    self._injected.popleft()
                    continue
                if rx_throttle is not None and not rx_throttle.admit():
                    return                       # the throttle's wake-up kicks us
                try:
                    length = recv_into(self._rx_views)
                except BlockingIOError:
                    self.wire.arm()              # drained: wake us when the wire has more
                    return
                except OSError as error:
                    if error.errno == errno.EINTR:
                        continue
                    self._broken_backend = True
                    self._note(f"reading the {'TAP' if self.tap else 'wire'} failed: "
                               f"{error.strerror}; receive stopped")
                    return
                if length > self._rx_capacity:
                    too_long += 1                # reached the spare byte: reused
                    continue
                complete(queue, length)
                frames += 1
                octets += length
                if rx_throttle is not None:
                    rx_throttle.charge(length - NET_HDR_SIZE)
            self.kick(RECEIVE_QUEUE)             # batch done: come back after the other queue
        finally:
            self.stats["rx_frames"] += frames
            self.stats["rx_bytes"] += octets - NET_HDR_SIZE * frames
            if too_long:
                self.stats["rx_dropped_too_long"] += too_long

    def _take_buffers(self, queue: Virtqueue) -> bool:
        """Pop receive chains until they hold a largest frame (one chain without
        MRG_RXBUF: a frame never spans chains then), within one readv()'s IOV_MAX
        buffers. False if the guest has too few."""
        pending, views, pop = self._pending, self._rx_views, queue.pop
        while self._rx_capacity < self._rx_target:
            if pending and not self._mergeable:
                return True                   # the one chain is what the driver gave us
            if self._held is not None:
                entry, self._held = self._held, None
                chain, capacity, count = entry
            else:
                chain = pop()
                if chain is None:
                    return False
                if chain.readable:
                    raise VirtqueueError(f"receive chain {chain.head} has device-readable "
                                         f"buffers")
                writable = chain.writable
                count = len(writable)
                capacity = len(writable[0]) if count == 1 else sum(map(len, writable))
                if capacity < NET_HDR_SIZE:
                    raise VirtqueueError(f"receive chain {chain.head} of {capacity} bytes "
                                         f"cannot hold the {NET_HDR_SIZE}-byte header")
                entry = (chain, capacity, count)
            if len(views) + count > IOV_MAX:          # views end with the spare byte
                if pending:
                    self._held = entry        # the next frame's; this one reads what we hold
                    return True
                queue.add_used(chain.head, 0)  # more buffers than one readv() takes
                self.stats["rx_chains_too_fragmented"] += 1
                continue
            pending.append(entry)
            views[-1:-1] = chain.writable
            self._rx_capacity += capacity
        return True

    def _complete(self, queue: Virtqueue, length: int) -> None:
        """``length`` bytes landed at the start of the pending buffers: say how many
        buffers the frame took, then hand them to the guest."""
        pending = self._pending
        chain, capacity, count = pending[0]
        first = chain.writable
        if length <= capacity or not self._mergeable:   # one buffer: the common case
            if len(first[0]) >= NET_HDR_SIZE:
                _U16.pack_into(first[0], NUM_BUFFERS_OFFSET, 1)
            else:
                _set_num_buffers(first, 1)
            queue.add_used(chain.head, length)
            pending.popleft()
            self._rx_capacity -= capacity
            del self._rx_views[:count]
            return
        used, remaining, views = 0, length, 0
        for _, capacity, count in pending:
            used += 1
            views += count
            remaining -= capacity
            if remaining <= 0:
                break
        if len(first[0]) >= NET_HDR_SIZE:
            _U16.pack_into(first[0], NUM_BUFFERS_OFFSET, used)
        else:
            _set_num_buffers(first, used)
        remaining = length
        for _ in range(used):
            chain, capacity, _count = pending.popleft()
            written = min(capacity, remaining)
            queue.add_used(chain.head, written)
            remaining -= written
            self._rx_capacity -= capacity
        del self._rx_views[:views]
