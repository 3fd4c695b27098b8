"""The vhost-user front end: one connection to a back end and the message
sequence a virtio transport drives through it (QEMU docs/interop/vhost-user.rst).

- :meth:`Frontend.connect` -- at machine build time: GET_FEATURES, then (when the
  back end offers VHOST_USER_F_PROTOCOL_FEATURES) GET_PROTOCOL_FEATURES and
  SET_PROTOCOL_FEATURES with what both sides know, GET_QUEUE_NUM (MQ), SET_OWNER.
- :meth:`Frontend.start` -- at the driver's DRIVER_OK: SET_FEATURES (the driver's
  bits, plus bit 30 if negotiated), SET_MEM_TABLE (every RAM region, the memfd
  passed with SCM_RIGHTS once per region), then per queue SET_VRING_NUM,
  SET_VRING_BASE, SET_VRING_ADDR (pykvm's virtual addresses, as the spec wants),
  SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR, and SET_VRING_ENABLE 1 when
  protocol features are on (rings start disabled then).
- :meth:`Frontend.stop` -- at reset or close: SET_VRING_ENABLE 0, GET_VRING_BASE
  per queue (which stops the ring in the back end).

With REPLY_ACK negotiated every request without a reply of its own sets
NEED_REPLY and waits for the back end's u64 (0 = done), so a refused request is an
error here instead of a silently dead queue. Every wait has a timeout: a back
end that hangs or dies is a :class:`VhostUserError`, which the transport turns into
NEEDS_RESET; the guest and its other devices keep running.

The socket calls are sendmsg/recvmsg/poll on a connected socket, which the vCPU
thread's seccomp role allows (DRIVER_OK arrives there as an MMIO write); the
socket itself is connected at build time, before any thread is confined.
"""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .. import sandbox
from ..control.access import peer_refusal
from . import protocol as p
from .protocol import Request, VhostUserError

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Vring:
    """One queue as the transport hands it over: guest addresses, size, fds."""
    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick_fd: int
    call_fd: int
    err_fd: int = -1
    base: int = 0


class Frontend:
    """A connected vhost-user socket; thread-safe (one request at a time)."""

    def __init__(self, sock: socket.socket, name: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.sock = sock
        self.name = name
        self.timeout = timeout
        self._lock = threading.Lock()
        self.features = 0               # the back end's GET_FEATURES
        self.protocol_features = 0      # negotiated (both sides)
        self.queue_num: int | None = None
        self.started: list[int] = []    # queue indices the back end serves now
        self.closed = False
        self._watcher: threading.Thread | None = None
        self._stop_fd = -1

    @classmethod
    def connect(cls, path: str, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> "Frontend":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock.connect(path)
                break
            except OSError as error:
                # a daemon just started binds its socket a moment before it listens
                if error.errno == errno.ECONNREFUSED and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                sock.close()
                raise VhostUserError(f"{name}: cannot connect to {path}: "
                                     f"{error.strerror}") from None
        # The back end gets the guest's RAM (SET_MEM_TABLE): only one run by this user or
        # root, whoever put the socket where it is (a user-given --disk vhost-user=SOCKET).
        refusal = peer_refusal(sock)
        if refusal is not None:
            sock.close()
            raise VhostUserError(f"{name}: refusing the back end at {path}: {refusal} "
                                 f"(it would map the guest's RAM)")
        frontend = cls(sock, name, timeout=timeout)
        try:
            frontend.handshake()
        except BaseException:
            frontend.close()
            raise
        return frontend

    # --- the wire ----------------------------------------------------------------------------
    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & p.PROTOCOL_F_REPLY_ACK)

    def _send(self, request: Request, payload: bytes = b"", fds=(), *,
              need_reply: bool = False) -> None:
        message = p.encode(request, payload, need_reply=need_reply)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        try:
            sent = self.sock.sendmsg([message], ancillary)
        except OSError as error:
            raise VhostUserError(f"{self.name}: sending {request.name}: "
                                 f"{error.strerror or error}") from None
        if sent != len(message):
            raise VhostUserError(f"{self.name}: {request.name} sent only in part")

    def _receive(self, request: Request) -> bytes:
        header = p.Header.decode(self._read_exactly(p.HEADER.size, request))
        payload = self._read_exactly(header.size, request) if header.size else b""
        if header.request != request or not header.flags & p.FLAG_REPLY:
            raise VhostUserError(f"{self.name}: expected the reply to {request.name}, got "
                                 f"request {header.request} (flags {header.flags:#x})")
        return payload

    def _read_exactly(self, length: int, request: Request) -> bytes:
        data = b""
        while len(data) < length:
            try:
                chunk = self.sock.recv(length - len(data))
            except OSError as error:
                what = "timed out" if isinstance(error, TimeoutError) else error.strerror
                raise VhostUserError(f"{self.name}: waiting for the reply to {request.name}: "
                                     f"{what}") from None
            if not chunk:
                raise VhostUserError(f"{self.name}: the back end closed the connection "
                                     f"(waiting for the reply to {request.name})")
            data += chunk
        return data

    def call(self, request: Request, payload: bytes = b"") -> bytes:
        """A request with a reply of its own (GET_*)."""
        with self._lock:
            self._send(request, payload)
            return self._receive(request)

    def tell(self, request: Request, payload: bytes = b"", fds=()) -> None:
        """A request without a reply; acknowledged when REPLY_ACK is negotiated."""
        with self._lock:
            self._send(request, payload, fds, need_reply=self.reply_ack)
            if self.reply_ack:
                status = p.decode_u64(self._receive(request), request.name)
                if status:
                    raise VhostUserError(f"{self.name}: the back end refused {request.name} "
                                         f"(status {status})")

    # --- the sequence ---------------------------------------------------------------------------
    def handshake(self) -> None:
        self.features = p.decode_u64(self.call(Request.GET_FEATURES), "GET_FEATURES")
        if self.features & p.F_PROTOCOL_FEATURES:
            offered = p.decode_u64(self.call(Request.GET_PROTOCOL_FEATURES),
                                   "GET_PROTOCOL_FEATURES")
            wanted = offered & p.SUPPORTED_PROTOCOL_FEATURES
            self.tell(Request.SET_PROTOCOL_FEATURES, p.u64(wanted))
            self.protocol_features = wanted    # REPLY_ACK applies from the next request
            if wanted & p.PROTOCOL_F_MQ:
                self.queue_num = p.decode_u64(self.call(Request.GET_QUEUE_NUM), "GET_QUEUE_NUM")
        self.tell(Request.SET_OWNER)

    def get_config(self, offset: int, size: int) -> bytes:
        """The back end's device config (only if it offers PROTOCOL_F_CONFIG)."""
        if not self.protocol_features & p.PROTOCOL_F_CONFIG:
            raise VhostUserError(f"{self.name}: the back end has no device configuration")
        if not 0 < size <= p.MAX_CONFIG:
            raise VhostUserError(f"{self.name}: GET_CONFIG of {size} bytes")
        reply = self.call(Request.GET_CONFIG, p.config_request(offset, size))
        return p.decode_config(reply, offset, size)

    def start(self, features: int, memory, vrings: list[Vring]) -> None:
        """Hand the queues to the back end (see the module doc for the order)."""
        if not memory.shareable:
            raise VhostUserError(f"{self.name}: guest RAM is not shareable (restored from a "
                                 f"snapshot file)")
        if self.features & p.F_PROTOCOL_FEATURES:
            features |= p.F_PROTOCOL_FEATURES
        self.tell(Request.SET_FEATURES, p.u64(features))
        regions = [p.MemoryRegion(r.guest_addr, r.size, r.host_addr, r.file_offset)
                   for r in memory.regions]
        self.tell(Request.SET_MEM_TABLE, p.memory_table(regions), [memory.fd] * len(regions))
        for ring in vrings:
            self.tell(Request.SET_VRING_NUM, p.vring_state(ring.index, ring.size))
            self.tell(Request.SET_VRING_BASE, p.vring_state(ring.index, ring.base))
            self.tell(Request.SET_VRING_ADDR, p.vring_addr(
                ring.index, memory.host_address(ring.desc, 16 * ring.size),
                memory.host_address(ring.used, 6 + 8 * ring.size),
                memory.host_address(ring.avail, 6 + 2 * ring.size)))
            self.tell(Request.SET_VRING_KICK, p.vring_fd(ring.index, True), [ring.kick_fd])
            self.tell(Request.SET_VRING_CALL, p.vring_fd(ring.index, True), [ring.call_fd])
            if ring.err_fd >= 0:
                self.tell(Request.SET_VRING_ERR, p.vring_fd(ring.index, True), [ring.err_fd])
            self.started.append(ring.index)
        if self.features & p.F_PROTOCOL_FEATURES:
            for ring in vrings:
                self.tell(Request.SET_VRING_ENABLE, p.vring_state(ring.index, 1))

    def set_call(self, index: int, fd: int) -> None:
        """SET_VRING_CALL again on a started ring: the transport moves the back end's
        used-buffer signal between the vector's KVM irqfd and its own eventfd as the
        driver masks and unmasks MSI-X vectors (what QEMU's vhost_virtqueue_mask does)."""
        if index in self.started:
            self.tell(Request.SET_VRING_CALL, p.vring_fd(index, True), [fd])

    def stop(self) -> dict[int, int]:
        """Stop every started ring; returns each one's next available index."""
        started, self.started = self.started, []
        bases = {}
        if self.features & p.F_PROTOCOL_FEATURES:
            for index in started:
                self.tell(Request.SET_VRING_ENABLE, p.vring_state(index, 0))
        for index in started:
            reply = self.call(Request.GET_VRING_BASE, p.vring_state(index, 0))
            bases[index] = p.decode_vring_state(reply, index)
        return bases

    # --- the back end going away ------------------------------------------------------------------
    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Call ``on_lost(reason)`` once, on a thread of its own, when the back end
        hangs up (it exited or closed the socket)."""
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._watcher = threading.Thread(target=self._watch, args=(on_lost,),
                                         name=f"{self.name}-watch", daemon=True)
        self._watcher.start()

    def _watch(self, on_lost: Callable[[str], None]) -> None:
        # "control", not "device": on a hang-up the device asks the daemon's process how
        # it ended (wait4) and reads its log, which the device role refuses.
        sandbox.thread_role("control")
        poller = select.poll()
        poller.register(self.sock.fileno(), 0)      # POLLHUP and POLLERR only
        poller.register(self._stop_fd, select.POLLIN)
        for fd, _ in poller.poll():
            if fd == self._stop_fd:
                return
        if not self.closed:
            on_lost("the vhost-user back end closed its socket")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
            if self._watcher is not None and self._watcher is not threading.current_thread():
                self._watcher.join(timeout=5)
            os.close(self._stop_fd)
            self._stop_fd = -1
        self.sock.close()
