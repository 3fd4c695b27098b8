"""Who may use a pykvm socket: the socket file, and the peer's credentials.

Local users are hostile. :func:`listen_unix` makes the socket 0600 (0660 and a
group's with --api-sock-group) and never replaces a live one or a non-socket;
:func:`peer_refusal` checks SO_PEERCRED on every accepted connection, so the file's
mode is not the only guard. The control socket, the gdb stub (pykvm/gdb/listen.py),
the Firecracker API (pykvm/api/firecracker/http.py) and vsock's host sockets all
listen through here.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct

from ..errors import ConfigError
from .protocol import MAX_REQUEST

MAX_CONNECTIONS = 8         # clients served at once; more are refused with one error line
_UCRED = struct.Struct("3i")     # struct ucred: pid, uid, gid


def listen_unix(path: str, option: str, group: int | None = None) -> socket.socket:
    """A listening Unix socket at ``path`` (given with ``option``), mode 0600 (0660 and
    ``group``'s when given); a stale socket file there is replaced, a live one (another
    pykvm) or any other file is an error. Peers are checked too: :func:`peer_refusal`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{option} {path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)       # nobody listens: left over from a killed pykvm
        except OSError as error:
            raise ConfigError(f"{option} {path}: cannot tell whether another process "
                              f"serves it: {error.strerror}") from None
        else:
            raise ConfigError(f"{option} {path}: another process serves this socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        if group is not None:
            os.chown(path, -1, group)
            os.chmod(path, 0o660)
        sock.listen(MAX_CONNECTIONS)
    except OSError as error:
        sock.close()
        if group is not None and error.errno == errno.EPERM:
            raise ConfigError(f"--api-sock-group: cannot give {path} to group {group}: "
                              f"{error.strerror} (you must belong to it)") from None
        raise ConfigError(f"{option} {path}: cannot listen: {error.strerror}") from None
    return sock


def remove_socket_file(path: str) -> None:
    """Remove the socket file a server listened on, if it is still a socket there."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def group_id(group: str) -> int:
    """The gid of --api-sock-group GROUP (a name or a number)."""
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ConfigError(f"--api-sock-group {group}: no such group") from None


def peer_refusal(connection: socket.socket, group: int | None = None) -> str | None:
    """Why the process at the other end of ``connection`` (accepted on a Unix socket) may
    not use it, or None: it must run as this process's uid or as root, or belong to
    ``group``. SO_PEERCRED gives the credentials the peer had when it connected
    (socket(7)), so the socket file's mode is not the only guard (a socket made
    accessible by mistake, a path in a directory other users control)."""
    try:
        raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
    except OSError as error:
        return f"cannot read the peer's credentials: {error.strerror}"
    if uid in (0, os.geteuid()):
        return None
    if group is not None and _in_group(uid, gid, group):
        return None
    return f"uid {uid} may not use this socket"


def _in_group(uid: int, gid: int, group: int) -> bool:
    """Whether a peer (its uid, and the gid SO_PEERCRED reports) belongs to ``group``."""
    import grp
    import pwd

    if gid == group:
        return True
    try:
        return pwd.getpwuid(uid).pw_name in grp.getgrgid(group).gr_mem
    except KeyError:
        return False


def refuse(connection: socket.socket, reason: str) -> None:
    """One error line to a client pykvm will not serve, then close, without blocking."""
    with connection:
        connection.setblocking(False)
        try:
            connection.send(json.dumps({"ok": False, "error": reason}).encode() + b"\n")
            connection.shutdown(socket.SHUT_WR)
            # Closing with unread input resets the connection (the line would be lost):
            # drop what the client already sent, a bounded amount.
            connection.recv(MAX_REQUEST)
        except OSError:
            pass
