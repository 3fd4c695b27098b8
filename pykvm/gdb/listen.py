"""Where the gdb stub listens, and who may connect.

Whoever connects owns the guest (the GDB Remote Serial Protocol has no
authentication: "Remote Protocol", Appendix E, ``M`` writes any memory, ``G`` any
register), so by default the stub serves a Unix socket: mode 0600, and every
connection's SO_PEERCRED must be this uid or root (:func:`pykvm.control.peer_refusal`,
the same check as the control socket's). TCP has no such check; it is served only
when asked for explicitly (``--gdb tcp:PORT`` on 127.0.0.1, or ``--gdb HOST:PORT``),
and the CLI warns then.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from dataclasses import dataclass

from ..control import listen_unix, peer_refusal
from ..errors import ConfigError

log = logging.getLogger("pykvm.gdb")


@dataclass(frozen=True)
class GdbAddress:
    """Where the stub listens: a Unix socket ``path``, or TCP ``host``:``port``."""

    path: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None

    @property
    def tcp(self) -> bool:
        return self.path is None

    @classmethod
    def parse(cls, text: str) -> "GdbAddress":
        """``--gdb`` text: ``tcp:PORT`` (127.0.0.1), ``HOST:PORT``, or a socket path."""
        text = str(text)
        if text.startswith("tcp:"):
            return cls(host="127.0.0.1", port=_port(text, text[4:]))
        host, colon, port = text.rpartition(":")
        if colon and port.isdigit() and "/" not in text:
            return cls(host=host.strip("[]") or "127.0.0.1", port=_port(text, port))
        if text.isdigit():
            raise ConfigError(f"--gdb {text}: a bare number is not a socket path; for TCP "
                              f"(no authentication) say --gdb tcp:{text}")
        if not text:
            raise ConfigError("--gdb: give a socket path (or tcp:PORT)")
        return cls(path=text)

    def describe(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"

    def gdb_target(self) -> str:
        """What gdb's ``target remote`` takes to reach it."""
        if self.path is not None:
            return self.path
        return f":{self.port}" if self.host == "127.0.0.1" else f"{self.host}:{self.port}"


def _port(text: str, port: str) -> int:
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--gdb {text}: not a TCP port number")
    return int(port)


class Listener:
    """The listening socket at a :class:`GdbAddress` (a TCP port 0 becomes the one
    the kernel chose: :attr:`address`)."""

    def __init__(self, where: GdbAddress):
        if where.path is not None:
            self.sock = listen_unix(where.path, "--gdb")
        else:
            try:
                self.sock = socket.create_server(
                    (where.host, where.port or 0),
                    family=socket.AF_INET6 if ":" in where.host else socket.AF_INET)
            except (OSError, OverflowError) as error:
                reason = getattr(error, "strerror", None) or str(error)
                raise ConfigError(f"--gdb {where.describe()}: cannot listen: {reason}") from None
            where = GdbAddress(host=where.host, port=self.sock.getsockname()[1])
        self.address = where

    def accept(self) -> socket.socket | None:
        """The next client allowed in; None when the listener was closed. A Unix peer
        that is neither this uid nor root is logged and dropped."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return None
            if self.address.tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
            refusal = peer_refusal(conn)
            if refusal is None:
                return conn
            log.warning("gdb: connection refused: %s", refusal)
            shut(conn)

    def close(self) -> None:
        """Stop listening; remove the socket file (only if it is still a socket)."""
        shut(self.sock)
        if self.address.path is not None:
            try:
                if stat.S_ISSOCK(os.lstat(self.address.path).st_mode):
                    os.unlink(self.address.path)
            except OSError:
                pass


def shut(sock: socket.socket | None) -> None:
    """Shut down and close ``sock`` (wakes a thread blocked in accept or recv)."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
