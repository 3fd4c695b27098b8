"""The host's side of the vsock muxer: the Unix sockets (Firecracker's ``docs/vsock.md``,
"Host-initiated" and "Guest-initiated" connections; its ``vsock/unix/muxer.rs`` and
``muxer_killq.rs`` are the model).

Why a module of its own: pykvm/vsock/muxer.py is the guest's side -- the packet state
machine of virtio 1.2 section 5.10.6 the device's queue worker drives. What is here
runs on the muxer's poll thread and only ever touches host sockets: the listener at
``uds_path`` (made without following a symlink, mode 0600), a client's ``CONNECT
<port>\\n`` handshake (bounded in bytes and time), dialling ``<uds_path>_<port>`` for a
guest's REQUEST, the poll loop over clients and connections, and the deadlines.
Clients and listeners are checked with SO_PEERCRED (pykvm/control/access.py).

:class:`HostSockets` is a mixin of :class:`~pykvm.vsock.muxer.UnixMuxer`: both halves
share the muxer's one lock and its connection table.
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import time
from dataclasses import dataclass

from .. import sandbox
from ..control.access import peer_refusal
from ..errors import ConfigError
from .connection import Connection, State
from .packet import OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, SHUTDOWN_BOTH

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


class HostSockets:
    """The poll thread's half of :class:`~pykvm.vsock.muxer.UnixMuxer` (see the module
    docstring); every method runs with the muxer's lock held."""

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


__all__ = ["HostSockets", "Handshake", "bind_listener", "FIRST_LOCAL_PORT"]
