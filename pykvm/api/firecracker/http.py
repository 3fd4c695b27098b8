"""Firecracker's API server: HTTP/1.1 on a Unix socket (stdlib ``http.server`` over
``socketserver``'s AF_UNIX server), routing each method and path to the :class:`~.vmm.Vmm`.

Responses are Firecracker's (swagger ``firecracker.yaml``): 200 with a JSON body for a
GET, 204 without a body for a request that changed something, 400 with
``{"fault_message": "..."}`` for anything refused, including an unknown path or
method, 500 with a fault message for a failure of pykvm itself.

A local client is untrusted (as on pykvm's control socket, pykvm/control.py): the
socket is 0600, a peer whose SO_PEERCRED uid is neither ours nor root is refused
before a byte is read, at most MAX_CONNECTIONS are served at once, a body is at most
MAX_BODY bytes (Content-Length checked before reading; chunked bodies refused), the
request line and headers are bounded by http.server (64 KiB, 100 headers), the JSON
parser by pykvm/control.py's depth and integer bounds, and an idle connection is
closed after IDLE_TIMEOUT seconds.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler

from ... import sandbox
from ...control import (ControlError, listen_unix, parse_request, peer_refusal,
                        remove_socket_file)
from ...errors import PykvmError
from .resources import ApiFault
from .vmm import Vmm

MAX_BODY = 50 * 1024          # Firecracker's HTTP_MAX_PAYLOAD_SIZE default (51200)
MAX_DISCARD = 1 << 20        # what is read and dropped of a body too large to serve
MAX_CONNECTIONS = 8
IDLE_TIMEOUT = 300.0
_ITEM = re.compile(r"^/(drives|network-interfaces)/([^/]+)$")


def routes(vmm: Vmm) -> dict:
    """(method, path) -> a callable of the body: GET ones return the JSON to send."""
    from . import FIRECRACKER_API_VERSION
    return {
        ("GET", "/"): lambda body: vmm.instance_info(),
        ("GET", "/version"): lambda body: {"firecracker_version": FIRECRACKER_API_VERSION},
        ("GET", "/machine-config"): lambda body: vmm.machine_config.to_json(),
        ("PUT", "/machine-config"): vmm.put_machine_config,
        ("PATCH", "/machine-config"): vmm.patch_machine_config,
        ("PUT", "/boot-source"): vmm.put_boot_source,
        ("PUT", "/actions"): vmm.action,
        ("PATCH", "/vm"): vmm.patch_vm,
        ("GET", "/vm/config"): lambda body: vmm.vm_config(),
        ("PUT", "/snapshot/create"): vmm.snapshot_create,
        ("PUT", "/snapshot/load"): vmm.snapshot_load,
        ("PUT", "/logger"): vmm.put_logger,
        ("PUT", "/metrics"): vmm.put_metrics,
        **vmm.balloon.routes(), **vmm.entropy.routes(), **vmm.vsock.routes(),
        **vmm.mmds.routes(),
    }


ITEM_ROUTES = {("PUT", "drives"): "put_drive", ("PATCH", "drives"): "patch_drive",
               ("PUT", "network-interfaces"): "put_network_interface",
               ("PATCH", "network-interfaces"): "patch_network_interface"}
# Firecracker endpoints pykvm does not serve yet: a clear fault, not "invalid path".
NOT_YET = ("/cpu-config", "/hotplug/memory")


def dispatch(vmm: Vmm, table: dict, method: str, path: str, body):
    """(status, JSON value or None) of one request; never raises."""
    try:
        path = path.split("?", 1)[0]
        handler = table.get((method, path))
        if handler is None:
            match = _ITEM.match(path)
            name = ITEM_ROUTES.get((method, match.group(1))) if match else None
            if name is not None:
                item = match.group(2)
                handler = lambda body: getattr(vmm, name)(item, body)  # noqa: E731
        if handler is None:
            if path in NOT_YET:
                raise ApiFault(f"{method} {path}: not supported by pykvm yet "
                               f"(docs/firecracker.md)")
            raise ApiFault(f"Invalid request method and/or path: {method} {path[:200]}.")
        if method != "GET" and body is None:
            raise ApiFault("The request body is missing.") if method in ("PUT", "PATCH") \
                else ApiFault("Empty request body")
        result = handler(body)
        if method == "GET":
            return HTTPStatus.OK, result
        return HTTPStatus.NO_CONTENT, None
    except ApiFault as fault:
        return HTTPStatus.BAD_REQUEST, {"fault_message": str(fault)}
    except PykvmError as error:
        return HTTPStatus.BAD_REQUEST, {"fault_message": _first_line(error)}
    except Exception as error:      # a bug in pykvm must not take the server down
        return HTTPStatus.INTERNAL_SERVER_ERROR, {
            "fault_message": f"internal error: {type(error).__name__}: {_first_line(error)}"}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Firecracker API"
    sys_version = ""
    timeout = IDLE_TIMEOUT

    def address_string(self) -> str:     # a Unix socket peer has no host:port
        return "unix"

    def log_message(self, format, *args) -> None:   # noqa: A002 - http.server's name
        self.server.api.vmm.log.log("Debug", format % args)

    def _serve(self) -> None:
        api = self.server.api
        body = None
        if self.headers.get("Transfer-Encoding"):
            self._send(HTTPStatus.BAD_REQUEST, {"fault_message": "chunked bodies are not "
                                                "accepted: send Content-Length"}, close=True)
            return
        length_text = self.headers.get("Content-Length", "0").strip()
        if not length_text.isdigit() or len(length_text) > 12:
            self._send(HTTPStatus.BAD_REQUEST, {"fault_message": "bad Content-Length"},
                       close=True)
            return
        length = int(length_text)
        if length > MAX_BODY:
            # Read (a bounded amount of) what the client sends before answering: closing
            # with unread input resets the connection, and the client loses the answer.
            self._discard(min(length, MAX_DISCARD))
            self._send(HTTPStatus(413), {
                "fault_message": f"Request payload with size {length} is larger than the "
                                 f"limit of {MAX_BODY} allowed by server."}, close=True)
            return
        if length:
            raw = self.rfile.read(length)
            if len(raw) != length:
                self.close_connection = True
                return
            try:
                body = parse_request(raw)
            except ControlError as error:
                self._send(HTTPStatus.BAD_REQUEST, {"fault_message": str(error)})
                return
        status, answer = dispatch(api.vmm, api.table, self.command, self.path, body)
        self._send(status, answer)

    def _discard(self, count: int) -> None:
        while count > 0:
            chunk = self.rfile.read(min(count, 1 << 16))
            if not chunk:
                return
            count -= len(chunk)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = do_OPTIONS = _serve

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own refusals (a bad request line, too many headers...) in
        Firecracker's shape: a JSON fault, the connection closed."""
        self._send(HTTPStatus(code), {"fault_message": message or HTTPStatus(code).phrase},
                   close=True)

    def _send(self, status: HTTPStatus, answer, close: bool = False) -> None:
        data = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        if answer is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if data:
            self.wfile.write(data)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, api: "ApiServer"):
        self.api = api
        socketserver.BaseServer.__init__(self, sock.getsockname(), _Handler)
        self.socket = sock
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def verify_request(self, request, client_address) -> bool:
        refusal = peer_refusal(request)
        if refusal is None and not self._slots.acquire(blocking=False):
            refusal = f"too many connections ({MAX_CONNECTIONS} are served at once)"
        if refusal is not None:
            _refuse(request, refusal)
            return False
        return True

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)
        except RuntimeError:          # the host refuses another thread
            self._slots.release()
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        pass          # a client that went away mid-request: nothing to report


def _refuse(connection: socket.socket, reason: str) -> None:
    """One 400 response to a client that will not be served, then close."""
    data = json.dumps({"fault_message": reason}).encode()
    head = (f"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
    try:
        connection.setblocking(False)
        connection.send(head + data)
        connection.shutdown(socket.SHUT_WR)
        connection.recv(MAX_BODY)
    except OSError:
        pass
    connection.close()


class ApiServer:
    """Serves Firecracker's API for ``vmm`` at ``path`` on a thread of its own until
    :meth:`close` (the socket file is removed then); a context manager."""

    def __init__(self, path: str, vmm: Vmm):
        self.path = str(path)
        self.vmm = vmm
        self.table = routes(vmm)
        self._server = _Server(listen_unix(self.path, "--api-sock"), self)
        self._thread = threading.Thread(target=self._serve, name="fc_api", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sandbox.thread_role("control")       # connection threads inherit it
        self._server.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        remove_socket_file(self.path)
        self._thread.join(timeout=5)

    def __enter__(self) -> "ApiServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
