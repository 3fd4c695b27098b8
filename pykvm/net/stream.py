"""The stream back end of virtio-net: Ethernet frames over a Unix stream socket,
each preceded by its length as a 32-bit number in network byte order.

That is the protocol of QEMU's ``-netdev stream`` (and its older ``-net socket``)
and what passt speaks on its socket or on the fd given with ``--fd`` (passt(1)).
Unlike a TAP it carries no virtio_net_hdr, so the wire offers no offloads: the
guest sends complete checksums and frames no larger than its MTU, and receives
the same.

Bounded buffers, whatever either side does:

- receive: one host buffer of :data:`RX_BUFFER` bytes (two largest frames with
  their prefixes). Reads fill it; complete frames are copied out of it into the
  guest's receive buffers (one copy, by memoryview slice assignment, with a
  zeroed header in front). A partial frame stays at the front until the rest
  arrives. A length of 0 (an empty frame), shorter than an Ethernet header or
  larger than :data:`MAX_FRAME` is counted and its bytes skipped as they come,
  so the framing stays in step without ever holding such a frame.
- transmit: one writev() of the prefix and the guest's frame (views of guest
  RAM: no copy). If the socket takes only part of it, the rest -- at most one
  frame -- is copied to a side buffer, ``send`` raises WireBusy, and a watcher
  thread kicks transmit when the socket is writable again; nothing else is
  written before that rest, so a short write never splits two frames.
  A guest frame shorter than an Ethernet header or longer than MAX_FRAME is
  refused (OSError EMSGSIZE: counted by the device as a transmit error) before
  a byte of it is written.
- end of stream (passt exited): ``recv_into`` raises ConnectionResetError; the
  device stops receiving until the driver resets it, and says so once.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import struct

from ..devices.virtio.queue import slice_views
from .tap import VNET_HDR_SIZE as NET_HDR_SIZE
from .wire import FdWatcher, Wire, WireBusy

LENGTH = struct.Struct(">I")
ETH_HLEN = 14
MAX_FRAME = 65535                       # passt's own limit (ETH_MAX_MTU)
RX_BUFFER = 2 * (LENGTH.size + MAX_FRAME)
_ZERO_HEADER = bytes(NET_HDR_SIZE)      # no offloads; num_buffers is the device's to fill


class StreamWire(Wire):
    """A connected stream socket ``fd`` (owned: closed with the wire)."""

    offloads = False

    def __init__(self, fd: int, mtu: int = 1500):
        os.set_blocking(fd, False)
        self.fd = fd
        self.mtu = mtu
        self.stats = collections.Counter()
        self._buffer = bytearray(RX_BUFFER)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0      # unread bytes are _buffer[_start:_end]
        self._skip = 0                   # bytes of a refused frame still to discard
        self._out = bytearray()          # the rest of a frame the socket took in part
        self._writer = None

    # --- receive ---------------------------------------------------------------------------
    def recv_into(self, views: list[memoryview]) -> int:
        while True:
            frame = self._next_frame()
            if frame is not None:
                break
            self._fill()
        need = NET_HDR_SIZE + len(frame)
        first = views[0]
        if len(first) >= need:
            first[:NET_HDR_SIZE] = _ZERO_HEADER
            first[NET_HDR_SIZE:need] = frame
            return need
        capacity = sum(map(len, views)) - 1          # the last view is the device's spare byte
        if need > capacity:
            return capacity + 1                      # too long for the buffers: dropped
        targets = slice_views(views, 0, need)
        data = _ZERO_HEADER + bytes(frame)
        done = 0
        for target in targets:
            target[:] = data[done:done + len(target)]
            done += len(target)
        return need

    def _next_frame(self) -> memoryview | None:
        """The next complete, acceptable frame in the buffer (consumed), or None."""
        buffer = self._buffer
        while True:
            available = self._end - self._start
            if self._skip:
                dropped = min(self._skip, available)
                self._start += dropped
                self._skip -= dropped
                if self._skip:
                    return None
                continue
            if available < LENGTH.size:
                return None
            (length,) = LENGTH.unpack_from(buffer, self._start)
            if length < ETH_HLEN or length > MAX_FRAME:
                self.stats["rx_empty" if length == 0 else "rx_malformed"] += 1
                self._start += LENGTH.size
                self._skip = length
                continue
            if available < LENGTH.size + length:
                return None
            begin = self._start + LENGTH.size
            self._start = begin + length
            return self._view[begin:begin + length]

    def _fill(self) -> None:
        """Read more of the stream after what the buffer holds (a partial frame, at
        most MAX_FRAME + 3 bytes, moves to the front first)."""
        if self._start:
            kept = self._end - self._start
            self._buffer[:kept] = self._buffer[self._start:self._end]
            self._start, self._end = 0, kept
        got = os.readv(self.fd, [self._view[self._end:]])   # BlockingIOError: none yet
        if got == 0:
            raise ConnectionResetError(errno.ECONNRESET, "the stream's peer (passt) closed it")
        self._end += got

    # --- transmit ---------------------------------------------------------------------------
    def send(self, views: list[memoryview]) -> None:
        length = sum(map(len, views)) - NET_HDR_SIZE
        if length < ETH_HLEN or length > MAX_FRAME:
            raise OSError(errno.EMSGSIZE, f"a {length}-byte frame cannot go on the stream")
        if self._out:                  # the device flushes first; never interleave frames
            raise OSError(errno.EAGAIN, "the stream still holds part of a frame")
        pieces = [LENGTH.pack(length), *slice_views(views, NET_HDR_SIZE)]
        try:
            written = os.writev(self.fd, pieces)
        except BlockingIOError:
            written = 0
        if written == LENGTH.size + length:
            return
        self._out = bytearray(b"".join(pieces)[written:])
        self.stats["tx_short_writes"] += 1
        self._writer.arm()
        raise WireBusy

    def flush(self) -> bool:
        if not self._out:
            return True
        try:
            written = os.write(self.fd, self._out)
        except BlockingIOError:
            written = 0
        except OSError:
            self._out = bytearray()     # the peer is gone: later frames fail on their own
            return True
        del self._out[:written]
        if self._out:
            self._writer.arm()
            return False
        return True

    # --- threads and the fd -------------------------------------------------------------------
    def start(self, kick_receive, kick_transmit, name: str) -> None:
        super().start(kick_receive, kick_transmit, name)
        self._writer = FdWatcher(self.fd, kick_transmit, f"{name}-tx", select.POLLOUT)
        self._writer.start()

    def stop(self) -> None:
        super().stop()
        if self._writer is not None:
            self._writer.stop()

    def close(self) -> None:
        self.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
