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
- receive: readv() from the TAP lands straight in the guest's receive buffers;
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

Rate limiters (Firecracker's ``rx_rate_limiter``/``tx_rate_limiter``, throttle.py):
transmit takes a chain only while ``tx_throttle`` admits it, receive reads the wire
only while ``rx_throttle`` does (frames wait in the TAP's or socket's kernel queue);
a timer kicks the queue when the buckets refill. A :class:`FrameFilter` (MMDS,
pykvm/mmds/) sees each transmitted frame first and answers the ones it claims
through the receive queue, never the back end.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import struct

from .device import VirtioDevice
from .queue import DescriptorChain, Virtqueue, VirtqueueError, scatter, slice_views
from .throttle import QueueThrottle
from ...net.wire import FdWatcher, Wire, WireBusy   # the back ends' interface (pykvm/net/wire.py)

logger = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 256

# --- feature bits (section 5.1.3) ---------------------------------------------------------
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16

VIRTIO_NET_S_LINK_UP = 1

BASIC_FEATURES = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU | VIRTIO_NET_F_MRG_RXBUF
OFFLOAD_FEATURES = (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
                    | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN
                    | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN)

# --- the header and the TAP --------------------------------------------------------------------
NET_HDR_SIZE = 12               # virtio_net_hdr_v1 (VERSION_1: num_buffers always present)
NUM_BUFFERS_OFFSET = 10
ETH_HEADER = 14 + 4             # Ethernet header with one VLAN tag
MAX_GSO_FRAME = NET_HDR_SIZE + ETH_HEADER + 65535
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08

RX_BATCH = 128                  # frames per worker turn before the other queue gets one
TX_BATCH = 128
RESET_DRAIN_LIMIT = 4096        # frames left in the TAP for a guest that reset: dropped
MAX_INJECTED = 256              # frames an in-VMM service (MMDS) may have waiting for RX
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024   # iovecs per readv()

_U16 = struct.Struct("<H")
_CONFIG = struct.Struct("<6sHHH")   # mac, status, max_virtqueue_pairs, mtu


def _set_num_buffers(views: list[memoryview], count: int) -> None:
    """num_buffers into a header that a driver split over descriptors."""
    scatter(slice_views(views, NUM_BUFFERS_OFFSET, 2), _U16.pack(count))


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


class NetDevice(VirtioDevice):
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
        # The hot loop of the transmit path: locals only, counters folded in at the end.
        send, pop, add_used = self.wire.send, queue.pop, queue.add_used
        frames = octets = malformed = errors = 0
        throttle = self.tx_throttle if self.tx_throttle.limiter is not None else None
        frame_filter = self._filter
        self._tx_wants_more = True
        if self._tx_blocked:
            if not self.wire.flush():
                self._tx_wants_more = False    # the wire's write watcher kicks us
                return
            self._tx_blocked = False
        try:
            for _ in range(TX_BATCH):
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

    def _receive(self, queue: Virtqueue) -> None:
        self._rx_wants_more = False
        if self._broken_backend:
            return
        recv_into, complete = self.wire.recv_into, self._complete
        frames = octets = 0
        rx_throttle = self.rx_throttle if self.rx_throttle.limiter is not None else None
        try:
            for _ in range(RX_BATCH):
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
                    self.stats["rx_dropped_too_long"] += 1   # reached the spare byte: reused
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
