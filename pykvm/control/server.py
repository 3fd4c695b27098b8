"""The control socket's server: a running machine answers the requests of
pykvm/control/protocol.py on a thread of its own (``pykvm run --api-sock PATH``).

Every resource a client can make it spend is bounded: connections
(MAX_CONNECTIONS, each on its own thread, idle ones dropped after IDLE_TIMEOUT),
requests (protocol.py). State changes (pause, resume, snapshot, stop) are served one
at a time under one lock; guest-agent requests (exec, copy_in, copy_out) are not, so
a long command never blocks a pause. A handler never raises: a PykvmError is one
error line, anything else "internal error" and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

from .. import sandbox
from ..errors import PykvmError, first_line
from .access import MAX_CONNECTIONS, group_id, listen_unix, peer_refusal, refuse, remove_socket_file
from .protocol import (ACTIONS, UNLOCKED_ACTIONS, ControlError, LineReader, RequestTooLong,
                       parse_request, send_line)

IDLE_TIMEOUT = 300.0        # seconds a connection may sit without sending a whole request


class ControlServer:
    """Serves ``path`` for ``machine`` on a thread of its own until :meth:`close`; the
    socket file is removed then. Use as a context manager.

    Clients are local users, and other local users are hostile: only the same uid or
    root may talk to it (SO_PEERCRED on every connection), or members of ``group`` when
    given (the socket is then 0660 and chgrp'ed to it). Every resource a client can make
    it spend is bounded: connections (MAX_CONNECTIONS), a request's length (MAX_REQUEST,
    refused whole, never split), its nesting (MAX_DEPTH) and its numbers (MAX_INT_DIGITS).
    """

    def __init__(self, path, machine, *, group: str | None = None):
        self.path = str(path)
        self.machine = machine
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
                refuse(connection, refusal)
                continue
            try:
                threading.Thread(target=self._connection, args=(connection,),
                                 name="api-conn", daemon=True).start()
            except RuntimeError:            # the host refuses another thread
                self._slots.release()
                refuse(connection, "cannot serve another connection now")

    def _connection(self, connection: socket.socket) -> None:
        try:
            with connection:
                connection.settimeout(IDLE_TIMEOUT)
                self._converse(connection, LineReader(connection))
        finally:
            self._slots.release()

    def _converse(self, connection: socket.socket, reader: "LineReader") -> None:
        while not self._closed:
            try:
                line = reader.readline()
            except RequestTooLong as error:
                # The rest of the line is not parsed as more requests: answer and hang up.
                send_line(connection, {"ok": False, "error": str(error)})
                return
            except OSError:           # the client went, or sat idle past IDLE_TIMEOUT
                return
            if line is None:
                return
            if not line.strip():
                continue
            response = self.handle_line(line)
            if not send_line(connection, response):
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
        from .. import __version__    # importlib.metadata: when asked, not with every run
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
        from ..snapshot import save_snapshot

        path = request.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError("snapshot needs a \"path\": the directory to write it to")
        self._running_vm()
        info = save_snapshot(self.machine, path)
        return {"state": self._state(), "snapshot": info.as_dict()}

    def _do_exec(self, request) -> dict:
        import base64

        from ..agent import AgentTimeout

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
