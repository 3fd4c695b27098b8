"""virtio-net (virtio 1.x, section 5.1) over a host back end: a TAP or a stream.

The device is written against a *wire* (:class:`Wire`): an fd to watch, ``send``
and ``recv_into`` for one frame each, and what it can carry. Two plug in:
:class:`TapWire` (below: a TAP, root's way) and pykvm/net/stream.py's
StreamWire (a Unix stream socket to passt, the unprivileged way; pykvm/net/passt.py
starts passt). What follows is the TAP's case; the stream's differences are in
stream.py: it carries no virtio header (so no offloads are offered), and its
``send`` may take a frame yet be unable to take another until the socket drains
(:class:`WireBusy`; a second watcher thread kicks transmit when it is writable).

Queue 0 is receiveq (frames for the guest), queue 1 transmitq (frames from
it); there is no control queue. Every frame in either direction starts with
the 12-byte virtio_net_hdr_v1, which is also what the TAP speaks (IFF_VNET_HDR,
TUNSETVNETHDRSZ 12, see pykvm/net/tap.py), so the header passes through:

- transmit: the chain's device-readable buffers -- header and frame, as views of
  guest RAM -- go to the TAP in one writev(); the kernel reads the header
  (checksum to complete, TSO segment size) itself.
- receive: without MRG_RXBUF readv() from the TAP lands straight in the guest's
  receive chain; with it a frame is read once into a host buffer of the largest
  frame and copied into only as many of the guest's buffers as it takes. The
  device only fills in num_buffers (net_receive.py: which buffers a frame takes,
  the IOV_MAX bound, frames too long for them).
- the common frame -- a chain of one descriptor: header and frame in one buffer
  to send, one buffer longer than any frame to receive into -- takes net_ring.py's
  fast path: a run of them straight off the ring, one write() or read() each, the
  used index stored once per run; every other chain goes through Virtqueue.pop.
- errors: a TAP that fails a read stops receive until the driver resets the
  device (reset clears it), never for the VM's lifetime.

Offloads: the device offers CSUM/HOST_TSO4/6/ECN (the guest may send partial
checksums and TSO frames: the TAP accepts them) and GUEST_CSUM/GUEST_TSO4/6/ECN;
what the guest accepts is told to the TAP with TUNSETOFFLOAD at DRIVER_OK, so
the host kernel sends it partial checksums and TSO frames only then.

Threads: both queues are served on the transport's queue worker (poll() on
the queue ioeventfds), never on a vCPU. The TAP is watched by a small thread of
its own that only kicks the receive queue when the TAP becomes readable, and
is re-armed when the worker has drained the TAP: a busy TAP costs one wake-up
per batch, not per frame. A batch is at most RX_BATCH / TX_BATCH frames, after
which the worker re-kicks itself, so neither direction starves the other.
Interrupts: the transport's (MSI-X irqfd, honouring EVENT_IDX), once per batch.
Transmit's batch is a whole 256-entry ring (vhost-net's VHOST_NET_PKT_WEIGHT is
256 too): half the passes and interrupts of 128, up to +16 % frames per CPU-second
(bench/RESULTS.md); receive keeps 128, half the ring, because the driver gets its
buffers back only at the end of a pass.

Rate limiters (Firecracker's ``rx_rate_limiter``/``tx_rate_limiter``, throttle.py):
transmit takes a chain only while ``tx_throttle`` admits it, receive reads the wire
only while ``rx_throttle`` does (frames wait in the TAP's or socket's kernel queue);
a timer kicks the queue when the buckets refill. A :class:`FrameFilter` (MMDS,
pykvm/mmds/) sees each transmitted frame first and answers the ones it claims
through the receive queue, never the back end.
"""

from __future__ import annotations

import collections
import functools
import io
import logging
import os
import struct

from .device import VirtioDevice
# The numbers of section 5.1 live in net_spec.py and the receive path in net_receive.py;
# all their names are importable from here, as before the split.
from .net_receive import IOV_MAX, RX_BATCH, NetReceive
from .net_spec import (BASIC_FEATURES, ETH_HEADER, MAX_GSO_FRAME, NET_HDR_SIZE,
                       NUM_BUFFERS_OFFSET, OFFLOAD_FEATURES, QUEUE_SIZE, RECEIVE_QUEUE,
                       TRANSMIT_QUEUE, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN,
                       VIRTIO_ID_NET, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                       VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                       VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
                       VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
                       VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP)
from .net_ring import BUSY, DONE, EMPTY, transmit_run
from .queue import DescriptorChain, Virtqueue
from .throttle import QueueThrottle
from ...net.wire import FdWatcher, Wire, WireBusy   # the back ends' interface (pykvm/net/wire.py)

logger = logging.getLogger(__name__)

TX_BATCH = 256
RESET_DRAIN_LIMIT = 4096        # frames left in the TAP for a guest that reset: dropped
MAX_INJECTED = 256              # frames an in-VMM service (MMDS) may have waiting for RX

_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu


class FrameFilter:
    """A service inside pykvm that answers some of the guest's frames itself (MMDS,
    pykvm/mmds/stack.py). :meth:`filter` gets one Ethernet frame the guest sent (no
    virtio header) and returns None when the frame is not its (it goes to the back
    end), else the frames to give the guest back (perhaps none)."""

    def filter(self, frame: bytes) -> list[bytes] | None:
        raise NotImplementedError


class TapWire(Wire):
    """A TAP (pykvm/net/tap.py) with IFF_VNET_HDR: header and frame pass through
    untouched, one writev()/readv() per frame."""

    offloads = True

    def __init__(self, tap, mtu: int = 1500):
        self.tap = tap
        self.fd = tap.fd
        self.mtu = mtu
        self.send = functools.partial(os.writev, tap.fd)
        self.send_frame = functools.partial(os.write, tap.fd)   # a TAP write is one frame
        # One read() per frame: a frame cut short fills the buffer (the kernel reports
        # what it copied), which recv_frame's callers take as too long.
        self._reader = io.FileIO(tap.fd, "r", closefd=False)
        self.recv_frame = self._reader.readinto     # None when nothing waits (EAGAIN)
        self.recv_into = functools.partial(os.readv, tap.fd)

    def set_offload(self, features: int) -> None:
        self.tap.set_offload(tun_offload(features))

    def close(self) -> None:
        self.stop()
        self.tap.close()


def tun_offload(features: int) -> int:
    """TUNSETOFFLOAD flags for what the driver accepted on receive."""
    if not features & VIRTIO_NET_F_GUEST_CSUM:
        return 0      # without partial checksums the kernel may not send TSO either
    flags = TUN_F_CSUM
    if features & VIRTIO_NET_F_GUEST_TSO4:
        flags |= TUN_F_TSO4
    if features & VIRTIO_NET_F_GUEST_TSO6:
        flags |= TUN_F_TSO6
    if features & VIRTIO_NET_F_GUEST_ECN and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    return flags


class NetDevice(NetReceive, VirtioDevice):
    """A NIC whose wire is ``wire`` (a :class:`Wire`; an open TAP, with ``fd`` and
    ``set_offload``, is wrapped in a TapWire). ``owner``, if given, is closed with
    the device instead of the wire alone (the NicBackend, which also undoes the
    host-side plumbing, or the passt process)."""

    device_id = VIRTIO_ID_NET
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    dhcp = False      # the default guest's /init asks DHCP for this NIC (user networking)

    def __init__(self, wire, mac: bytes, *, mtu: int = 1500, offloads: bool = True,
                 name: str = "virtio-net", owner=None):
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        if not isinstance(wire, Wire):
            wire = TapWire(wire, mtu)
        self.name = name
        self.wire = wire
        self.tap = getattr(wire, "tap", None)
        self.fd = wire.fd
        self.mac = bytes(mac)
        self.mtu = mtu
        self.owner = owner
        self.features = BASIC_FEATURES | (OFFLOAD_FEATURES if offloads and wire.offloads else 0)
        self.stats = collections.Counter()
        self._mergeable = False
        self._rx_target = NET_HDR_SIZE + ETH_HEADER + mtu
        self._pending: collections.deque[tuple[DescriptorChain, int, int]] = collections.deque()
        # A validated receive chain that did not fit the readv() bound: the next frame's.
        self._held: tuple[DescriptorChain, int, int] | None = None
        # readv() target: the pending buffers, then one spare host byte. The kernel
        # truncates a frame to the buffers and reports only what it copied, so a
        # frame that reaches the spare byte did not fit.
        self._spill = memoryview(bytearray(1))
        self._rx_views: list[memoryview] = [self._spill]
        self._rx_capacity = 0
        # MRG_RXBUF: each frame is read here (the largest frame + the spare byte), then
        # copied into the chains it takes; ``_bounced``: the one frame waiting in it.
        self._bounce = memoryview(bytearray(self._rx_target + 1))
        self._bounced = 0
        self._rx_wants_more = False
        self._tx_wants_more = True
        self._tx_blocked = False        # the wire said WireBusy: flush it before the next frame
        self._broken_backend = False
        # Firecracker's rx_rate_limiter / tx_rate_limiter (devices/virtio/throttle.py).
        self.rx_throttle = QueueThrottle(lambda: self.kick(RECEIVE_QUEUE), f"{name}-rx-limit")
        self.tx_throttle = QueueThrottle(lambda: self.kick(TRANSMIT_QUEUE), f"{name}-tx-limit")
        # An in-VMM service on this NIC (MMDS, pykvm/mmds/): see set_frame_filter.
        self._filter: FrameFilter | None = None
        self._injected: collections.deque[bytes] = collections.deque()
        wire.start(self._tap_readable, self._wire_writable, name)

    def set_frame_filter(self, frame_filter: "FrameFilter | None") -> None:
        """Give every frame the guest sends to ``frame_filter`` first: the frames it
        claims (it returns a list of replies, perhaps empty) never reach the back end,
        and its replies go into the guest's receive queue, at most MAX_INJECTED waiting
        (the rest are dropped and counted, as a full NIC drops)."""
        self._filter = frame_filter

    def describe(self) -> str:
        """One line for the user: the host end (the NicBackend's words) and the MAC."""
        if self.owner is not None and hasattr(self.owner, "describe"):
            return self.owner.describe()
        return f"{type(self.wire).__name__} fd {self.fd}, MAC " + ":".join(f"{b:02x}" for b in self.mac)

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, min(self.mtu, 0xFFFF))

    # --- negotiation -------------------------------------------------------------------------
    def activate(self, features: int) -> None:
        super().activate(features)
        self._mergeable = bool(features & VIRTIO_NET_F_MRG_RXBUF)
        gso = features & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6)
        self._rx_target = MAX_GSO_FRAME if gso and features & VIRTIO_NET_F_GUEST_CSUM \
            else NET_HDR_SIZE + ETH_HEADER + self.mtu
        if len(self._bounce) != self._rx_target + 1:
            self._bounce = memoryview(bytearray(self._rx_target + 1))
        self._drop_pending()
        try:
            self.wire.set_offload(features)
        except Exception as error:   # noqa: BLE001 - the guest still works without offloads
            self._note(f"cannot enable offloads on the TAP: {error}")
            self.stats["offload_errors"] += 1

    def reset(self) -> None:
        super().reset()
        self._drop_pending()
        self._broken_backend = False   # a new driver gets a new chance at the TAP
        try:
            self.wire.set_offload(0)
        except Exception:   # noqa: BLE001
            pass
        # Frames queued for the old driver (perhaps as TSO frames it accepted) are not
        # for the next one.
        scratch = [memoryview(bytearray(MAX_GSO_FRAME)), self._spill]
        for _ in range(RESET_DRAIN_LIMIT):
            try:
                self.wire.recv_into(scratch)
            except OSError:
                break
            self.stats["rx_dropped_reset"] += 1

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._injected.clear()
        self._held = None
        self._bounced = 0
        self._rx_views = [self._spill]
        self._rx_capacity = 0

    # --- queues (the transport's worker thread) ----------------------------------------------
    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == TRANSMIT_QUEUE:
            self._transmit(queue)
        elif index == RECEIVE_QUEUE:
            self._receive(queue)

    def wants_more(self, index: int) -> bool:
        return self._rx_wants_more if index == RECEIVE_QUEUE else self._tx_wants_more

    def _transmit(self, queue: Virtqueue) -> None:
        # Runs of one-descriptor frames go through net_ring.transmit_run (no throttle,
        # no filter); any other chain, one at a time, through pop() below. Locals
        # only, counters folded in at the end.
        send, pop, add_used = self.wire.send, queue.pop, queue.add_used
        frames = octets = malformed = errors = 0
        throttle = self.tx_throttle if self.tx_throttle.limiter is not None else None
        frame_filter = self._filter
        fast = throttle is None and frame_filter is None
        self._tx_wants_more = True
        if self._tx_blocked:
            if not self.wire.flush():
                self._tx_wants_more = False    # the wire's write watcher kicks us
                return
            self._tx_blocked = False
        try:
            taken = 0
            while taken < TX_BATCH:
                if fast:
                    run = transmit_run(queue, self.wire.send_frame, TX_BATCH - taken)
                    taken += run.frames + run.errors
                    frames += run.frames
                    octets += run.octets
                    errors += run.errors
                    if run.outcome == EMPTY:
                        return
                    if run.outcome == BUSY:
                        self._tx_blocked = True
                        self._tx_wants_more = False
                        return
                    if run.outcome == DONE:
                        break
                    # SLOW: the next chain is not a one-descriptor frame: pop() takes it
                taken += 1
                if throttle is not None and not throttle.admit():
                    self._tx_wants_more = False   # the throttle's wake-up kicks us
                    return
                chain = pop()
                if chain is None:
                    return
                views = chain.readable
                length = len(views[0]) if len(views) == 1 else sum(map(len, views))
                if throttle is not None:
                    throttle.charge(max(0, length - NET_HDR_SIZE))
                if length < NET_HDR_SIZE or length > MAX_GSO_FRAME:
                    malformed += 1          # no frame is that short or that long
                elif frame_filter is not None and self._offer(frame_filter, views):
                    pass                    # answered inside pykvm: not for the back end
                else:
                    try:
                        send(views)
                        frames += 1
                        octets += length
                    except OSError:
                        errors += 1   # the kernel (or the stream's checks) refused it
                    except WireBusy:  # taken, but the socket is full: wait until writable
                        frames += 1
                        octets += length
                        add_used(chain.head, 0)
                        self._tx_blocked = True
                        self._tx_wants_more = False
                        return
                add_used(chain.head, 0)
            self._tx_wants_more = False       # the worker comes back after the other queue
            self.kick(TRANSMIT_QUEUE)
        finally:
            stats = self.stats
            stats["tx_frames"] += frames
            stats["tx_bytes"] += octets - NET_HDR_SIZE * frames
            if malformed or errors:
                stats["tx_malformed"] += malformed
                stats["tx_errors"] += errors

    def _offer(self, frame_filter: "FrameFilter", views: list[memoryview]) -> bool:
        """True if ``frame_filter`` claimed the frame; its replies are queued for RX."""
        replies = frame_filter.filter(b"".join(views)[NET_HDR_SIZE:])
        if replies is None:
            return False
        self.stats["tx_intercepted"] += 1
        for reply in replies:
            if len(self._injected) >= MAX_INJECTED:
                self.stats["rx_dropped_injected"] += 1
                continue
            self._injected.append(reply)
        if replies:
            self.kick(RECEIVE_QUEUE)
        return True

    # --- the TAP watcher's side ------------------------------------------------------------------
    def _tap_readable(self) -> None:
        self.kick(RECEIVE_QUEUE)

    def _wire_writable(self) -> None:
        self.kick(TRANSMIT_QUEUE)

    def _note(self, message: str) -> None:
        logger.warning("%s: %s", self.name, message)

    def close(self) -> None:
        self.wire.stop()
        self.rx_throttle.close()
        self.tx_throttle.close()
        self._drop_pending()
        if self.owner is not None:
            self.owner.close()
        else:
            self.wire.close()


def open_net_devices(specs, machine_key: str = "", *, vm=None) -> list[NetDevice]:
    """A NetDevice for each --net NetSpec, its TAP opened and plumbed or its passt
    started (pykvm/net/);
    on any failure the ones already opened are closed again. With ``vm``, each
    NIC's host-side clean-up is also registered with ``vm.on_close`` (it runs once,
    whichever comes first: the device's close or the VM's)."""
    from ...net.plumbing import check_specs, default_mac, open_nic

    check_specs(list(specs))
    devices: list[NetDevice] = []
    try:
        for index, spec in enumerate(specs):
            backend = open_nic(spec, spec.mac or default_mac(machine_key, index))
            try:
                device = NetDevice(getattr(backend, "wire", None) or backend.tap, backend.mac,
                                   mtu=backend.mtu, name=f"virtio-net{index}", owner=backend)
                device.dhcp = getattr(backend, "dhcp", False)
            except BaseException:
                backend.close()
                raise
            devices.append(device)
            if vm is not None:
                vm.on_close(backend.close)
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices
