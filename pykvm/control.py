"""The control socket: a running machine answers JSON requests on a Unix socket.

``pykvm run --api-sock PATH`` serves it; ``pykvm ctl PATH ACTION [ARGS]`` is its client.
One request per line, one response per line, any number per connection:

    {"action": "status"}                         -> {"ok": true, "state": "running", ...}
    {"action": "pause"} / {"action": "resume"}   -> {"ok": true, "state": "paused"|"running"}
    {"action": "snapshot", "path": "DIR"}        -> {"ok": true, "snapshot": {sizes, seconds}}
    {"action": "stats"}                          -> {"ok": true, "vcpus": [per-vCPU exit counts]}
    {"action": "stop"}                           -> {"ok": true, "state": "stopping"}
    {"action": "exec", "command": "CMD"}         -> {"ok": true, "status": N, "stdout": b64,
     (or "argv": [...]; optional "stdin": b64,      "stderr": b64, "seconds": S}; a timeout:
      "env": {}, "cwd", "timeout": S)               "timed_out": true, "status" of the kill
    {"action": "copy_in", "host_path": P, "guest_path": G}  -> {"ok": true}  (file or dir;
    {"action": "copy_out", "guest_path": G, "host_path": P} -> {"ok": true}   host paths are
                                                    this host's: pykvm reads/writes them)
    anything wrong                               -> {"ok": false, "error": "one line"}

A request may carry an ``"id"``, echoed in its response. A snapshot of a running VM
pauses it for the snapshot and resumes it after; a paused VM stays paused.

Firecracker's REST API itself (HTTP on a Unix socket, its resources and states) is
``pykvm firecracker`` / ``pykvm-firecracker``: pykvm/api/firecracker, docs/firecracker.md.
Loading a snapshot is not a request here: a snapshot is loaded into a fresh process
(``pykvm run --restore DIR``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
from pathlib import Path

from . import sandbox
from .errors import ConfigError, PykvmError

MAX_REQUEST = 1 << 16       # bytes in one request line, newline excluded
MAX_CONNECTIONS = 8         # clients served at once; more are refused with one error line
MAX_DEPTH = 32              # nesting of arrays and objects in a request
MAX_INT_DIGITS = 32         # digits of a JSON integer (CPython's int() is quadratic past ~4300)
IDLE_TIMEOUT = 300.0
MAX_RESPONSE = 1 << 30      # what a client reads of one response (exec output included)        # seconds a connection may sit without sending a whole request
ACTIONS = ("status", "pause", "resume", "snapshot", "stats", "stop", "exec", "copy_in",
           "copy_out")
# Guest-agent requests (pykvm/agent.py) take as long as the guest needs: they do not hold
# the lock that orders state changes, so pause, snapshot and stop are served meanwhile.
UNLOCKED_ACTIONS = ("exec", "copy_in", "copy_out")


class ControlError(PykvmError):
    """The control socket cannot be served, reached, or answered a request with an error."""


class RequestTooLong(ControlError):
    """A request line longer than MAX_REQUEST: the connection is closed after the answer."""


_UCRED = struct.Struct("3i")     # struct ucred: pid, uid, gid


class ControlServer:
    """Serves ``path`` for ``machine`` on a thread of its own until :meth:`close`; the
    socket file is removed then. Use as a context manager.

    Clients are local users, and other local users are hostile: only the same uid or
    root may talk to it (SO_PEERCRED on every connection), or members of ``group`` when
    given (the socket is then 0660 and chgrp'ed to it). Every resource a client can make
    it spend is bounded: connections (MAX_CONNECTIONS), a request's length (MAX_REQUEST,
    refused whole, never split), its nesting (MAX_DEPTH) and its numbers (MAX_INT_DIGITS).
    """

    def __init__(self, path, machine, *, log=sys.stderr, group: str | None = None):
        self.path = str(path)
        self.machine = machine
        self.log = log
        self.group = None if group is None else group_id(group)
        self.started = time.monotonic()
        self._lock = threading.Lock()     # one state-changing request at a time
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._closed = False
        self._sock = listen_unix(self.path, "--api-sock", self.group)
        self._thread = threading.Thread(target=self._serve, name="api-sock", daemon=True)
        self._thread.start()

    # --- serving ------------------------------------------------------------------------------
    def _serve(self) -> None:
        """Accept clients; at most MAX_CONNECTIONS are served at once, each on a thread of its
        own. A peer whose credentials do not pass (:func:`peer_refusal`) or one too many
        gets one error line and is closed, without a thread."""
        sandbox.thread_role("control")   # pykvm/sandbox; connection threads inherit it
        while not self._closed:
            try:
                connection, _ = self._sock.accept()
            except OSError:
                return            # closed
            refusal = peer_refusal(connection, self.group)
            if refusal is None and not self._slots.acquire(blocking=False):
                refusal = f"too many connections ({MAX_CONNECTIONS} are served at once)"
            if refusal is not None:
                _refuse(connection, refusal)
                continue
            try:
                threading.Thread(target=self._connection, args=(connection,),
                                 name="api-conn", daemon=True).start()
            except RuntimeError:            # the host refuses another thread
                self._slots.release()
                _refuse(connection, "cannot serve another connection now")

    def _connection(self, connection: socket.socket) -> None:
        try:
            with connection:
                connection.settimeout(IDLE_TIMEOUT)
                self._converse(connection, _LineReader(connection))
        finally:
            self._slots.release()

    def _converse(self, connection: socket.socket, reader: "_LineReader") -> None:
        while not self._closed:
            try:
                line = reader.readline()
            except RequestTooLong as error:
                # The rest of the line is not parsed as more requests: answer and hang up.
                _send_line(connection, {"ok": False, "error": str(error)})
                return
            except OSError:           # the client went, or sat idle past IDLE_TIMEOUT
                return
            if line is None:
                return
            if not line.strip():
                continue
            response = self.handle_line(line)
            if not _send_line(connection, response):
                return
            if response.get("state") == "stopping":
                self.machine.vm.request_stop("user", 0, "stopped through the control socket")

    def handle_line(self, line: bytes) -> dict:
        """Answer one request line; never raises (see :func:`parse_request`)."""
        try:
            request = parse_request(line)
        except ControlError as error:
            return {"ok": False, "error": str(error)}
        return self.handle(request)

    def handle(self, request) -> dict:
        """Answer one request (a dict); never raises."""
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is a JSON object with an \"action\""}
        action = request.get("action")
        response: dict
        try:
            if action not in ACTIONS:
                raise ControlError(f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
            lock = contextlib.nullcontext() if action in UNLOCKED_ACTIONS else self._lock
            with lock:
                response = getattr(self, f"_do_{action}")(request)
            response = {"ok": True, **response}
        except PykvmError as error:
            response = {"ok": False, "error": first_line(error)}
        except Exception as error:   # a bug must not take the server down
            response = {"ok": False, "error": f"internal error: {type(error).__name__}: {error}"}
        if "id" in request:
            response["id"] = request["id"]
        return response

    # --- actions --------------------------------------------------------------------------------
    def _state(self) -> str:
        vm = self.machine.vm
        return "stopping" if vm.stop_requested else vm.state.value

    def _do_status(self, request) -> dict:
        from . import __version__    # importlib.metadata: when asked, not with every run
        machine = self.machine
        return {"state": self._state(), "pykvm_version": __version__,
                "host_kind": machine.kvm.host_kind, "vcpus": len(machine.vm.vcpus),
                "mem_size": machine.config.mem_size, "uptime_s": round(
                    time.monotonic() - self.started, 3)}

    def _do_pause(self, request) -> dict:
        self._running_vm().pause()
        return {"state": self._state()}

    def _do_resume(self, request) -> dict:
        self._running_vm().resume()
        return {"state": self._state()}

    def _do_stop(self, request) -> dict:
        return {"state": "stopping"}     # the stop follows the response (_connection)

    def _do_stats(self, request) -> dict:
        return {"state": self._state(), "vcpus": [v.stats.as_dict() for v in self.machine.vm.vcpus]}

    def _do_snapshot(self, request) -> dict:
        from .snapshot import save_snapshot

        path = request.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError("snapshot needs a \"path\": the directory to write it to")
        self._running_vm()
        info = save_snapshot(self.machine, path)
        return {"state": self._state(), "snapshot": info.as_dict()}

    def _do_exec(self, request) -> dict:
        import base64

        from .agent import AgentTimeout

        command = request.get("argv", request.get("command"))
        if isinstance(command, list) and command and all(isinstance(w, str) for w in command):
            pass
        elif not isinstance(command, str) or not command:
            raise ControlError("exec needs \"command\" (a shell command line) or \"argv\" "
                               "(a list of strings)")
        options = {}
        if request.get("stdin") is not None:
            try:
                options["stdin"] = base64.b64decode(request["stdin"], validate=True)
            except (ValueError, TypeError):
                raise ControlError("exec: \"stdin\" must be base64") from None
        for name, kind in (("env", dict), ("cwd", str), ("timeout", (int, float))):
            if request.get(name) is not None:
                if not isinstance(request[name], kind):
                    raise ControlError(f"exec: \"{name}\" has the wrong type")
                options[name] = request[name]
        self._running_vm()
        try:
            result = self.machine.exec(command, **options)
        except AgentTimeout as timeout:
            partial = timeout.result.as_dict() if timeout.result else {"status": None}
            return {**partial, "timed_out": True, "error": str(timeout)}
        return result.as_dict()

    def _do_copy_in(self, request) -> dict:
        host, guest = self._copy_paths(request)
        self._running_vm()
        self.machine.copy_in(host, guest)
        return {}

    def _do_copy_out(self, request) -> dict:
        host, guest = self._copy_paths(request)
        self._running_vm()
        self.machine.copy_out(guest, host)
        return {}

    @staticmethod
    def _copy_paths(request) -> tuple[str, str]:
        host, guest = request.get("host_path"), request.get("guest_path")
        if not isinstance(host, str) or not host or not isinstance(guest, str) or not guest:
            raise ControlError("copy_in/copy_out need \"host_path\" and \"guest_path\"")
        if not os.path.isabs(host):
            raise ControlError(f"host_path {host!r} must be absolute (it is read by the pykvm "
                               f"process, not the client)")
        return host, guest

    def _running_vm(self):
        vm = self.machine.vm
        if vm.stop_requested:
            raise ControlError("the VM is stopping")
        return vm

    # --- the end -----------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        remove_socket_file(self.path)
        self._thread.join(timeout=5)

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def _refuse(connection: socket.socket, reason: str) -> None:
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


def _send_line(connection: socket.socket, response: dict) -> bool:
    try:
        connection.sendall(json.dumps(response).encode() + b"\n")
    except OSError:
        return False
    return True


class _LineReader:
    """Request lines from a socket, at most MAX_REQUEST bytes each: a longer one raises
    RequestTooLong (whole: the server then closes, so no tail of it is read as a request)."""

    def __init__(self, connection: socket.socket):
        self.connection = connection
        self.buffer = bytearray()

    def readline(self) -> bytes | None:
        """The next line (with its newline; the last one may lack it), None at the end."""
        while True:
            end = self.buffer.find(b"\n")
            if end > MAX_REQUEST or (end < 0 and len(self.buffer) > MAX_REQUEST):
                raise RequestTooLong(f"request longer than {MAX_REQUEST} bytes: refused, "
                                     f"and the connection closed")
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                return line
            chunk = self.connection.recv(MAX_REQUEST)
            if not chunk:
                line, self.buffer = bytes(self.buffer), bytearray()
                return line or None
            self.buffer += chunk


def parse_request(line: bytes):
    """One request line -> the JSON value, or ControlError. Bounded: the nesting is checked
    before the parser recurses, integers longer than MAX_INT_DIGITS are refused before
    int() sees them; whatever the parser still raises is one error, never a dead thread."""
    if len(line) > MAX_REQUEST + 1:
        raise ControlError(f"request longer than {MAX_REQUEST} bytes")
    try:
        text = line.decode()
    except UnicodeDecodeError as error:
        raise ControlError(f"not a JSON request: {error}") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise ControlError(f"not a JSON request: nested deeper than {MAX_DEPTH} levels")
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as error:
        # JSONDecodeError is a ValueError, and so is an integer refused by _bounded_int.
        raise ControlError(f"not a JSON request: {first_line(error)}") from None


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in the JSON ``text`` (brackets in strings not
    counted); cheap when there are few brackets at all."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


_DECODER = json.JSONDecoder(parse_int=_bounded_int)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__





# --- the client -------------------------------------------------------------------------------------
def request(path, message: dict, timeout: float = 600.0) -> dict:
    """Send one request to the socket at ``path``; returns the response dict."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"{path}: no such control socket (is pykvm running with "
                               f"--api-sock {path}?)") from None
        except OSError as error:
            what = "nobody serves it" if error.errno == errno.ECONNREFUSED else error.strerror
            raise ControlError(f"{path}: cannot connect: {what}") from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass     # a server that refuses this client says why, then hangs up: read it
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_RESPONSE)
    except socket.timeout:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    finally:
        sock.close()
    if not line:
        raise ControlError(f"{path}: the VM closed the connection without answering")
    return json.loads(line)


def parse_command(words: list[str]) -> dict:
    """``pykvm ctl PATH`` arguments after the path: ACTION [ARGS] -> a request."""
    if not words:
        raise ConfigError(f"pykvm ctl: give an action: {', '.join(ACTIONS)}")
    action, args = words[0], words[1:]
    if action not in ACTIONS:
        raise ConfigError(f"pykvm ctl: unknown action {action!r} (one of {', '.join(ACTIONS)})")
    if action == "snapshot":
        if len(args) != 1:
            raise ConfigError("pykvm ctl PATH snapshot DIR: give the snapshot directory")
        return {"action": action, "path": str(Path(args[0]).absolute())}
    if args:
        raise ConfigError(f"pykvm ctl: {action} takes no arguments")
    return {"action": action}
