"""The host side of virtio-vsock in Firecracker's convention: guest ports mapped to
Unix sockets (Firecracker's ``docs/vsock.md``; its ``vsock/unix/muxer.rs`` is the
model).

Host-initiated
    pykvm listens on ``uds_path``. A client connects and writes ``CONNECT <port>\\n``;
    the muxer picks a local port (from 2**30 up, as Firecracker does), sends the guest
    a REQUEST for ``<port>``, and on the guest's RESPONSE writes ``OK <local port>\\n``
    to the client. From then on the Unix socket carries the stream. A guest RST, or no
    answer within CONNECT_TIMEOUT, closes the client's socket.

Guest-initiated
    A REQUEST to the host (CID 2) port P connects to the Unix socket
    ``<uds_path>_<P>``; the guest gets a RESPONSE if a listener took it, an RST if not.

Bounds, with a hostile guest and hostile local users in mind:

- at most ``max_connections`` connections and connecting clients in all; beyond it
  new clients wait in the listen backlog and guest REQUESTs get an RST;
- a client has HANDSHAKE_TIMEOUT seconds and HANDSHAKE_MAX bytes to say CONNECT;
- per connection, host memory is the ``tx`` buffer the guest's credit bounds
  (pykvm/vsock/connection.py); host-to-guest bytes are never buffered;
- control packets due are flags on their connection, and RSTs for packets naming
  no connection queue up to MAX_RESETS (beyond, dropped: the guest's REQUEST then
  times out as if the packet were lost);
- a packet that fails :func:`pykvm.vsock.packet.check`, or breaks the state
  machine or the credit, resets that connection (an RST to the guest, the host
  socket closed); nothing a guest sends stops the device or the VMM;
- the socket is created relative to its directory's fd, without following a
  symlink at its name, mode 0600; a client (and a guest-initiated connection's
  listener) must run as this user or root (SO_PEERCRED).

Threads: the device calls :meth:`guest_packet` and :meth:`fill` on its queue worker;
one poll thread (pykvm/vsock/host_sockets.py: the listener, handshakes, dialling,
deadlines) watches the listener, clients and connections and calls ``kick`` when it
has something for the guest. One lock guards all of it.
"""

from __future__ import annotations

import collections
import os
import threading

from ..devices.virtio.queue import scatter, slice_views
from .connection import CONTROL_ORDER, Connection, CreditViolation, State
from .host_sockets import FIRST_LOCAL_PORT, Handshake, HostSockets, bind_listener
from .packet import (HEADER_SIZE, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
                     OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_SEND,
                     TYPE_STREAM, Header)

MAX_CONNECTIONS = 256
MAX_RESETS = 256


class UnixMuxer(HostSockets):
    """The connections of one vsock device whose guest has CID ``guest_cid``."""

    def __init__(self, guest_cid: int, uds_path: str, *, kick=lambda: None,
                 max_connections: int = MAX_CONNECTIONS):
        self.guest_cid = guest_cid
        self.uds_path = os.path.abspath(uds_path)
        self.max_connections = max_connections
        self.kick = kick
        self.stats: collections.Counter = collections.Counter()
        self.connections: dict[tuple[int, int], Connection] = {}
        self._handshakes: dict[int, Handshake] = {}
        self._resets: collections.deque[tuple[int, int]] = collections.deque()
        self._ready: dict[tuple[int, int], None] = {}    # connections with work, in order
        self._next_port = FIRST_LOCAL_PORT
        self._lock = threading.Lock()
        self._listener = bind_listener(uds_path)
        self._inode = os.stat(self.uds_path).st_ino
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vsock-muxer", daemon=True)
        self._thread.start()

    # --- the device's side (queue worker) --------------------------------------------------------
    def guest_packet(self, header: Header, payload: list[memoryview]) -> None:
        """A packet from the guest that passed packet.check (``payload``: its RW bytes)."""
        with self._lock:
            self.stats[f"rx_{header.op}"] += 1
            key = (header.dst_port, header.src_port)
            conn = self.connections.get(key)
            if header.op == OP_REQUEST:
                self._guest_connects(key, conn)
                if key in self.connections:
                    self.connections[key].learn_credit(header)
            elif conn is None:
                if header.op != OP_RST:
                    self._reset_unknown(key)
            else:
                conn.learn_credit(header)
                self._connected_packet(conn, header, payload)
            self._settle(self.connections.get(key))

    def reject(self, header: Header, reason: str) -> None:
        """A packet that failed its checks: the connection it names is reset."""
        with self._lock:
            self.stats["rx_bad_packets"] += 1
            key = (header.dst_port, header.src_port)
            conn = self.connections.get(key)
            if conn is not None:
                self._kill(conn, notify=True)
            elif header.op != OP_RST:
                self._reset_unknown(key)
        self.kick()

    def fill(self, views: list[memoryview]) -> int:
        """Write the next packet for the guest into a receive chain's ``views`` (at least
        HEADER_SIZE bytes); its length, 0 when there is nothing to send."""
        with self._lock:
            while self._resets:
                local, peer = self._resets.popleft()
                header = Header(HOST_CID, self.guest_cid, local, peer, 0, TYPE_STREAM, OP_RST,
                                0, 0, 0)
                return self._write(views, header)
            for _ in range(len(self._ready)):
                key = next(iter(self._ready))
                del self._ready[key]
                conn = self.connections.get(key)
                if conn is None:
                    continue
                written = self._next_packet(conn, views)
                if conn.key in self.connections and conn.has_work():
                    self._ready[key] = None          # to the back: round robin
                if written:
                    return written
            return 0

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._resets or self._ready)

    def reset(self) -> None:
        """The driver reset the device, or the transport was reset: every connection goes
        (its host socket closed), nothing is left for the guest."""
        with self._lock:
            for conn in list(self.connections.values()):
                self._kill(conn, notify=False)
            self._resets.clear()
            self._ready.clear()
        self._poke()

    def close(self) -> None:
        self._stopping = True
        self._poke()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._lock:
            for conn in list(self.connections.values()):
                self._kill(conn, notify=False)
            for handshake in self._handshakes.values():
                handshake.sock.close()
            self._handshakes.clear()
            if self._listener is not None:
                self._remove_socket_file()
                self._listener.close()
                self._listener = None
            if self._wake >= 0:
                os.close(self._wake)
                self._wake = -1

    # --- the state machine -------------------------------------------------------------------------
    def _guest_connects(self, key: tuple[int, int], existing: Connection | None) -> None:
        """REQUEST: the poll thread connects to ``<uds_path>_<port>`` (:meth:`_dial`)."""
        if existing is not None:            # a REQUEST on a live connection: both go
            self._kill(existing, notify=True)
            return
        if len(self.connections) + len(self._handshakes) >= self.max_connections:
            self.stats["refused_too_many"] += 1
            self._reset_unknown(key)
            return
        self.connections[key] = Connection(None, key[0], key[1], State.DIALING)

    def _connected_packet(self, conn: Connection, header: Header,
                          payload: list[memoryview]) -> None:
        op = header.op
        if op == OP_RST:
            self._kill(conn, notify=False)
        elif op == OP_RESPONSE:
            if conn.state is not State.CONNECTING:
                self._kill(conn, notify=True)
                return
            conn.state, conn.deadline = State.ESTABLISHED, None
            try:
                conn.sock.send(f"OK {conn.local_port}\n".encode())
            except OSError:
                self._kill(conn, notify=True)
        elif conn.state is not State.ESTABLISHED:
            self._kill(conn, notify=True)      # only RESPONSE or RST answer our REQUEST
        elif op == OP_RW:
            if conn.peer_shutdown & SHUTDOWN_SEND:
                self._kill(conn, notify=True)  # it said it would send no more
                return
            try:
                conn.from_guest(slice_views(payload, 0, header.len), header.len)
            except CreditViolation:
                self.stats["credit_violations"] += 1
                self._kill(conn, notify=True)
            except OSError:
                self._kill(conn, notify=True)  # the host end is gone
            else:
                self.stats["rx_bytes"] += header.len
                if conn.credit_update_due():   # the host took them: say so, or a guest
                    conn.want(OP_CREDIT_UPDATE)  # at the end of its credit would wait
        elif op == OP_SHUTDOWN:
            conn.peer_shutdown |= header.flags  # the poll thread acts on it (_tidy)
        elif op == OP_CREDIT_REQUEST:
            conn.want(OP_CREDIT_UPDATE)
        # CREDIT_UPDATE: its credit was learnt above; the poll set changes with it.

    def _settle(self, conn: Connection | None) -> None:
        """After a change to ``conn``: queue it if it has work, re-arm the poll thread."""
        if conn is not None and conn.key in self.connections and conn.has_work():
            self._ready[conn.key] = None
        if self._resets or self._ready:
            self.kick()
        self._poke()

    def _kill(self, conn: Connection, *, notify: bool) -> None:
        """Remove ``conn`` and close its host socket; with ``notify``, RST the guest."""
        if self.connections.get(conn.key) is conn:
            del self.connections[conn.key]
            self._ready.pop(conn.key, None)
            conn.close()
            self.stats["closed"] += 1
            self._poke()    # the poll thread holds the socket's file while it polls it
        if notify:
            self._reset_unknown(conn.key)

    def _reset_unknown(self, key: tuple[int, int]) -> None:
        if len(self._resets) < MAX_RESETS:
            self._resets.append(key)
        else:
            self.stats["resets_dropped"] += 1

    # --- packets for the guest -----------------------------------------------------------------------
    def _write(self, views: list[memoryview], header: Header, payload: int = 0) -> int:
        scatter(views, header.pack())
        self.stats[f"tx_{header.op}"] += 1
        return HEADER_SIZE + payload

    def _next_packet(self, conn: Connection, views: list[memoryview]) -> int:
        for op in CONTROL_ORDER:
            if op in conn.pending:
                conn.pending.discard(op)
                flags = conn.shutdown_flags if op == OP_SHUTDOWN else 0
                written = self._write(views, conn.header(op, self.guest_cid, flags=flags))
                if op == OP_RST:
                    self._kill(conn, notify=False)
                return written
        if not (conn.readable and conn.can_read_host()):
            return 0
        room = sum(map(len, views)) - HEADER_SIZE
        limit = min(room, conn.peer_credit(), MAX_PAYLOAD)
        if limit <= 0:
            return 0
        try:
            count = conn.sock.recvmsg_into(slice_views(views, HEADER_SIZE, limit))[0]
        except BlockingIOError:
            conn.readable = False
            self._poke()
            return 0
        except OSError:
            self._kill(conn, notify=False)
            return self._write(views, conn.header(OP_RST, self.guest_cid))
        if count == 0:                     # the host end sent its last byte
            conn.host_eof = True
            conn.readable = False
            return self._write(views, conn.header(OP_SHUTDOWN, self.guest_cid,
                                                  flags=SHUTDOWN_SEND))
        conn.tx_cnt = (conn.tx_cnt + count) & 0xFFFF_FFFF
        self.stats["tx_bytes"] += count
        return self._write(views, conn.header(OP_RW, self.guest_cid, count), count)


__all__ = ["UnixMuxer", "bind_listener", "MAX_CONNECTIONS", "FIRST_LOCAL_PORT"]
