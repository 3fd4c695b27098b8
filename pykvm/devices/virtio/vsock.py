"""virtio-vsock (virtio 1.2, section 5.10): stream sockets between the guest and the
host, in Python (the hosts pykvm targets have no /dev/vhost-vsock).

Queues (5.10.2): 0 rx (packets for the guest, in device-writable buffers), 1 tx
(packets from the guest, device-readable), 2 event (device-writable buffers for
``struct virtio_vsock_event``). The config space is the guest's CID, le64 (5.10.4).
No feature bits are offered: stream sockets only (5.10.3).

The device only moves packets between the queues and a back end (the muxer,
pykvm/vsock/muxer.py, Firecracker's Unix-socket convention); connections, their
state machine and credit live there. What the device checks itself:

- tx: a chain must hold the 44-byte header (it is copied once, so the guest cannot
  change it afterwards) and no device-writable buffer; each header then goes
  through pykvm/vsock/packet.py's check (CIDs, type, op, len against the buffers).
  A chain that fails is returned and counted; a header that fails resets the
  connection it names. None of it stops the device.
- rx: a chain must be device-writable only and hold at least a header; one that
  does not breaks the queue rules (VirtqueueError: DEVICE_NEEDS_RESET), as for
  virtio-net. A chain popped while nothing was due is held for the next packet.

Snapshots (as Firecracker does): connections are not saved -- their other ends are
host sockets that a restored VM does not have. The restored device sends the guest
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (5.10.6.5) as soon as the event queue has a
buffer; Linux then resets every socket and rereads the CID. The saving VM keeps its
connections.
"""

from __future__ import annotations

import collections
import os
import struct
from dataclasses import dataclass
from typing import Annotated

from ...errors import SnapshotError
from ...snapshot.schema import Bounds
from ...snapshot.state import ComponentState
from ...vsock.packet import (EVENT_TRANSPORT_RESET, HEADER_SIZE, MAX_GUEST_CID, MIN_GUEST_CID,
                             Header, check)
from .device import VirtioDevice
from .queue import DescriptorChain, Virtqueue, VirtqueueError, gather, scatter, slice_views

VIRTIO_ID_VSOCK = 19
RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZE = 256               # Firecracker's, for all three
EVENT_QUEUE_SIZE = 16
TX_BATCH = 256                 # packets per worker turn before rx gets one
RX_BATCH = 256

_EVENT = struct.Struct("<I")


@dataclass(frozen=True)
class VsockState(ComponentState, tag="virtio-vsock"):
    """What a snapshot keeps of the device: the CID the guest was told (checked against
    the restoring machine's). Connections are not kept (module docstring)."""

    guest_cid: Annotated[int, Bounds(MIN_GUEST_CID, MAX_GUEST_CID)]


class VsockDevice(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    name = "virtio-vsock"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, EVENT_QUEUE_SIZE)

    def __init__(self, guest_cid: int, backend, *, cleanup=None):
        """``backend``: the muxer (guest_packet, reject, fill, has_pending, reset,
        close, and a ``kick`` attribute it calls when it has a packet for the guest).
        ``cleanup``: called once the back end is closed (the private directory)."""
        super().__init__()
        self.guest_cid = guest_cid
        self.backend = backend
        self.uds_path = getattr(backend, "uds_path", "")
        self._cleanup = cleanup
        backend.kick = lambda: self.kick(RX_QUEUE)
        self.stats: collections.Counter = collections.Counter()
        self._held: DescriptorChain | None = None     # an rx chain popped while idle
        self._reset_event_due = False
        self._rx_wants_more = False
        self._tx_wants_more = True

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # --- queues (the transport's worker) ------------------------------------------------------
    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == TX_QUEUE:
            self._transmit(queue)
        elif index == RX_QUEUE:
            self._receive(queue)
        elif index == EVENT_QUEUE:
            self._event(queue)

    def wants_more(self, index: int) -> bool:
        if index == RX_QUEUE:
            return self._rx_wants_more
        return self._tx_wants_more if index == TX_QUEUE else False

    def _transmit(self, queue: Virtqueue) -> None:
        self._tx_wants_more = True
        for _ in range(TX_BATCH):
            chain = queue.pop()
            if chain is None:
                return
            self._packet(chain)
            queue.add_used(chain.head, 0)
        self._tx_wants_more = False       # batch done: rx gets a turn, then us again
        self.kick(TX_QUEUE)

    def _packet(self, chain: DescriptorChain) -> None:
        readable = chain.readable
        size = sum(map(len, readable))
        if chain.writable or size < HEADER_SIZE:
            self.stats["tx_malformed_chains"] += 1
            return
        header = Header.unpack(gather(readable, HEADER_SIZE))
        problem = check(header, self.guest_cid, size - HEADER_SIZE)
        if problem is not None:
            self.stats["tx_bad_packets"] += 1
            self.backend.reject(header, problem)
            return
        self.backend.guest_packet(header, slice_views(readable, HEADER_SIZE, header.len))

    def _receive(self, queue: Virtqueue) -> None:
        self._rx_wants_more = False
        for _ in range(RX_BATCH):
            if not self.backend.has_pending():
                return
            chain = self._held or queue.pop()
            self._held = None
            if chain is None:
                self._rx_wants_more = True    # out of buffers: the guest's notify resumes us
                return
            if chain.readable or sum(map(len, chain.writable)) < HEADER_SIZE:
                raise VirtqueueError(f"vsock receive chain {chain.head} is not a device-"
                                     f"writable buffer of at least {HEADER_SIZE} bytes")
            written = self.backend.fill(chain.writable)
            if not written:
                self._held = chain
                return
            queue.add_used(chain.head, written)
        self.kick(RX_QUEUE)                   # batch done: come back after the others

    def _event(self, queue: Virtqueue) -> None:
        if not self._reset_event_due:
            return                            # buffers wait for an event
        chain = queue.pop()
        if chain is None:
            return
        if chain.readable or sum(map(len, chain.writable)) < _EVENT.size:
            raise VirtqueueError(f"vsock event chain {chain.head} cannot hold an event")
        scatter(chain.writable, _EVENT.pack(EVENT_TRANSPORT_RESET))
        queue.add_used(chain.head, _EVENT.size)
        self._reset_event_due = False
        self.stats["transport_resets"] += 1

    # --- life cycle ------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._held = None
        self._rx_wants_more = False
        self.backend.reset()

    def close(self) -> None:
        self.backend.close()
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()

    def save_state(self) -> VsockState:
        return VsockState(self.guest_cid)

    def restore_state(self, state: VsockState) -> None:
        if state.guest_cid != self.guest_cid:
            raise SnapshotError(f"{self.name}: the snapshot's guest CID is {state.guest_cid}, "
                                f"this machine's {self.guest_cid}")
        self.transport_reset()

    def transport_reset(self) -> None:
        """Drop every connection and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)."""
        self.backend.reset()
        self._held = None
        self._reset_event_due = True
        self.kick(EVENT_QUEUE)


def open_vsock_device(spec) -> VsockDevice:
    """The device of a :class:`~pykvm.vsock.VsockSpec`, listening on its ``uds_path``;
    without one, on ``vsock.sock`` in a new private directory (0700) that goes with the
    device. ConfigError if the socket cannot be made."""
    import shutil
    import tempfile

    from ...vsock.muxer import UnixMuxer

    private = None
    path = spec.uds_path
    if not path:
        private = tempfile.mkdtemp(prefix="pykvm-vsock-")
        path = os.path.join(private, "vsock.sock")
    try:
        muxer = UnixMuxer(spec.guest_cid, path)
    except BaseException:
        if private:
            shutil.rmtree(private, ignore_errors=True)
        raise
    return VsockDevice(spec.guest_cid, muxer, cleanup=(lambda: shutil.rmtree(
        private, ignore_errors=True)) if private else None)
