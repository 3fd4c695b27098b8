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
one poll thread here watches the listener, clients and connections and calls
``kick`` when it has something for the guest. One lock guards all of it.
"""

from __future__ import annotations

import collections
import errno
import os
import re
import select
import socket
import threading
import time
from dataclasses import dataclass

from .. import sandbox
from ..control.access import peer_refusal
from ..devices.virtio.queue import scatter, slice_views
from ..errors import ConfigError
from .connection import CONTROL_ORDER, Connection, CreditViolation, State
from .packet import (HEADER_SIZE, HOST_CID, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
                     OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH,
                     SHUTDOWN_SEND, TYPE_STREAM, Header)

MAX_CONNECTIONS = 256
MAX_RESETS = 256
HANDSHAKE_MAX = 32             # "CONNECT 4294967295\n" is 19 bytes
HANDSHAKE_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0         # a guest that neither answers nor refuses a REQUEST
FIRST_LOCAL_PORT = 1 << 30
_CONNECT = re.compile(rb"^CONNECT ([0-9]{1,10})\n$")


@dataclass(eq=False)
class Handshake:
    """A client on ``uds_path`` that has not said CONNECT yet."""

    sock: socket.socket
    deadline: float


def bind_listener(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, made relative to its directory's
    fd: bind(2) never follows a symlink at the name (it fails with EADDRINUSE on
    anything there), and the mode is set on the socket before bind, not on the path
    after it. An existing file is an error, as in Firecracker."""
    directory, name = os.path.split(os.path.abspath(path))
    if not name:
        raise ConfigError(f"vsock uds_path {path!r}: not a file name")
    try:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"vsock uds_path {path}: {directory}: {error.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(f"/proc/self/fd/{dir_fd}/{name}")
        sock.listen(64)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        reason = "exists already (remove it first)" if error.errno == errno.EADDRINUSE \
            else error.strerror
        raise ConfigError(f"vsock uds_path {path}: {reason}") from None
    finally:
        os.close(dir_fd)
    return sock


class UnixMuxer:
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

    def _dial(self, conn: Connection) -> None:
        """On the poll thread (sockets are not the device role's): connect, check the
        listener's owner, then RESPONSE; an RST if nobody (or a stranger) listens."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC |
                             socket.SOCK_NONBLOCK)
        try:
            sock.connect(f"{self.uds_path}_{conn.local_port}")
            refusal = peer_refusal(sock)
            if refusal is not None:
                raise PermissionError(refusal)
        except OSError:
            sock.close()
            self.stats["guest_connect_refused"] += 1
            self._kill(conn, notify=True)
            return
        conn.sock, conn.state = sock, State.ESTABLISHED
        conn.want(OP_RESPONSE)
        self._ready[conn.key] = None

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

    # --- the poll thread --------------------------------------------------------------------------------
    def _poke(self) -> None:
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        # It accepts, connects and checks peers: the role that talks to clients.
        sandbox.thread_role("control")    # pykvm/sandbox: seccomp, unless --no-seccomp
        while not self._stopping:
            poller = select.poll()
            poller.register(self._wake, select.POLLIN)
            with self._lock:
                watched, timeout = self._watch(poller)
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                continue
            if self._stopping:
                return
            with self._lock:
                for fd, mask in events:
                    self._event(watched.get(fd), fd, mask)
                self._expire(time.monotonic())
                self._tidy()
                work = bool(self._resets or self._ready)
            if work:
                self.kick()

    def _watch(self, poller) -> tuple[dict, int | None]:
        watched: dict = {}
        if self._listener is not None and \
                len(self.connections) + len(self._handshakes) < self.max_connections:
            poller.register(self._listener, select.POLLIN)
            watched[self._listener.fileno()] = self._listener
        deadlines = []
        for fd, handshake in self._handshakes.items():
            poller.register(fd, select.POLLIN)
            watched[fd] = handshake
            deadlines.append(handshake.deadline)
        for conn in self.connections.values():
            events = (select.POLLIN if conn.can_read_host() and not conn.readable else 0) | \
                (select.POLLOUT if conn.tx else 0)
            if events:
                poller.register(conn.sock, events)
                watched[conn.sock.fileno()] = conn
            if conn.deadline is not None:
                deadlines.append(conn.deadline)
        timeout = None
        if deadlines:
            timeout = max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)
        return watched, timeout

    def _event(self, what, fd: int, mask: int) -> None:
        if fd == self._wake:
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass
        elif what is self._listener and what is not None:
            self._accept()
        elif isinstance(what, Handshake):
            self._handshake(what)
        elif isinstance(what, Connection) and self.connections.get(what.key) is what:
            if mask & (select.POLLOUT | select.POLLERR) and what.tx:
                try:
                    what.flush()
                except OSError:
                    self._kill(what, notify=True)
                    return
                if what.credit_update_due():
                    what.want(OP_CREDIT_UPDATE)
            if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                what.readable = True
            if what.has_work():
                self._ready[what.key] = None

    def _tidy(self) -> None:
        """Dial what the guest asked for; act on the guest's SHUTDOWNs once its bytes
        are out: no more input for the host socket, and when the guest closed both
        ways our RST completes the close (5.10.6.6)."""
        for conn in list(self.connections.values()):
            if conn.state is State.DIALING:
                self._dial(conn)
                continue
            conn.close_host_write_if_done()
            if conn.peer_shutdown == SHUTDOWN_BOTH and not conn.tx:
                self._kill(conn, notify=True)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        refusal = peer_refusal(sock)
        if refusal is not None:
            self.stats["clients_refused"] += 1
            sock.close()
            return
        self._handshakes[sock.fileno()] = Handshake(sock, time.monotonic() + HANDSHAKE_TIMEOUT)

    def _handshake(self, handshake: Handshake) -> None:
        """Read ``CONNECT <port>\\n`` without taking a byte past it (those are the stream's)."""
        sock = handshake.sock
        try:
            seen = sock.recv(HANDSHAKE_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            seen = b""
        end = seen.find(b"\n")
        if end < 0:
            if not seen or len(seen) >= HANDSHAKE_MAX:
                self._drop_handshake(handshake)   # closed, or no line where one must be
            return
        line = sock.recv(end + 1)
        match = _CONNECT.match(line)
        port = int(match.group(1)) if match else -1
        if not 0 <= port <= 0xFFFF_FFFF:
            self._drop_handshake(handshake)
            return
        del self._handshakes[sock.fileno()]
        local = self._local_port(port)
        conn = Connection(sock, local, port, State.CONNECTING,
                          deadline=time.monotonic() + CONNECT_TIMEOUT)
        self.connections[conn.key] = conn
        conn.want(OP_REQUEST)
        self._ready[conn.key] = None

    def _drop_handshake(self, handshake: Handshake) -> None:
        self.stats["bad_handshakes"] += 1
        del self._handshakes[handshake.sock.fileno()]
        handshake.sock.close()

    def _local_port(self, peer_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFF_FFFE else FIRST_LOCAL_PORT
            if (port, peer_port) not in self.connections:
                return port

    def _expire(self, now: float) -> None:
        for handshake in [h for h in self._handshakes.values() if h.deadline <= now]:
            self._drop_handshake(handshake)
        for conn in [c for c in self.connections.values()
                     if c.deadline is not None and c.deadline <= now]:
            self.stats["connect_timeouts"] += 1
            self._kill(conn, notify=True)

    def _remove_socket_file(self) -> None:
        """Unlink ``uds_path`` if it is still the socket we made (not a file put there since)."""
        try:
            if os.lstat(self.uds_path).st_ino == self._inode:
                os.unlink(self.uds_path)
        except OSError:
            pass


__all__ = ["UnixMuxer", "bind_listener", "MAX_CONNECTIONS", "FIRST_LOCAL_PORT"]
