"""The host's client of the guest agent.

The client
----------
:class:`AgentClient` is transport-neutral: it writes frames with a ``send``
callable and is fed whatever the channel delivers (:meth:`AgentClient.feed`,
on the device's I/O thread). :class:`pykvm.machine.Machine` wires one to its
virtio-serial port (``Machine.exec``, ``put_file``, ``get_file``); the tests
wire one to the agent running on the host over a socketpair.
"""

from __future__ import annotations

import errno as errno_module
import itertools
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from .errors import (AgentError, AgentTimeout, AgentUnavailable, CommandFailed, InvalidRequest,
                     ProtocolError, RequestRefused, TooMuchOutput)
from .files import FileRequests
from .protocol import (CMDLINE_FLAG, DATA, DEFAULT_READY_TIMEOUT, ERROR, EXEC, EXIT, FILE_INFO,
                       FILE_INFO_HEAD, OK, PING, PONG, READY, REFRESH, SIGNAL, STDERR, STDIN,
                       STDOUT, FrameReader, data_frames, exec_payload, frame)
from .result import Result, describe

KILL_GRACE = 15.0          # seconds to wait for EXIT after the SIGKILL of a timed-out command
# What a guest may send back, bounded (the guest is hostile): a command's stdout and its
# stderr, and a file read into memory, each at most MAX_OUTPUT bytes; a file or directory
# copied out to disk (streamed, never gathered) at most MAX_FILE. AgentClient takes others.
MAX_OUTPUT = 64 << 20
MAX_FILE = 4 << 30
MAX_PENDING = 4 << 20      # bytes on their way to a sink before the channel waits


@dataclass
class _Request:
    kind: int
    frames: list = field(default_factory=list)       # (type, payload) in arrival order
    done: bool = False
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    status: int | None = None
    error: tuple[int, str] | None = None
    info: tuple[int, int] | None = None
    data: bytearray = field(default_factory=bytearray)
    on_output: Callable[[int, bytes], object] | None = None
    limit: int = MAX_OUTPUT        # bytes each of stdout, stderr and data may reach
    sink: BinaryIO | None = None   # stdout (EXEC) or data (GET_FILE) are written here
    sunk: int = 0                  # bytes for the sink so far (written or pending)
    pending: list = field(default_factory=list)   # chunks the waiter still has to write
    pending_bytes: int = 0
    waited: bool = True            # someone still waits for it (False once forgotten)
    overflow: str | None = None    # which stream passed the limit


class AgentClient(FileRequests):
    """Requests to one guest agent. Thread-safe: several threads may run commands at
    once. ``alive()`` says whether the guest can still answer (a stopped VM cannot);
    waits give up with AgentError as soon as it returns False."""

    def __init__(self, send: Callable[[bytes], object], *,
                 alive: Callable[[], bool] = lambda: True, max_output: int = MAX_OUTPUT,
                 max_file: int = MAX_FILE):
        self.max_output = max_output         # see MAX_OUTPUT
        self.max_file = max_file             # see MAX_FILE
        self._send_raw = send
        self._alive = alive
        self._reader = FrameReader()
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._broken: str | None = None
        self._closed: str | None = None
        self.ready_info: str | None = None     # READY's text, when one was seen
        self.answered = False                  # a PONG (or any reply) came back
        self.discarded = 0                     # frames for requests no one waits for

    # --- the channel ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes from the guest (the channel's reader thread); never blocks for long."""
        with self._cond:
            try:
                frames = self._reader.feed(data)
            except ProtocolError as error:
                self._fail_all(f"agent protocol error: {error}")
                return
            for kind, request_id, payload in frames:
                self._dispatch(kind, request_id, payload)
            self._cond.notify_all()

    def _dispatch(self, kind: int, request_id: int, payload: bytes) -> None:
        if kind == READY:
            version = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
            self.ready_info = f"protocol {version}: {payload[4:].decode(errors='replace')}"
            self.answered = True
            return
        request = self._requests.get(request_id)
        if request is None or request.done:
            self.discarded += 1
            return
        self.answered = True
        if kind == STDOUT or kind == STDERR:
            if kind == STDOUT:
                self._collect(request, "stdout", request.stdout, payload)
            else:
                self._collect(request, "stderr", request.stderr, payload, to_sink=False)
            if request.on_output is not None:
                try:
                    request.on_output(kind, payload)
                except Exception:
                    request.on_output = None
        elif kind == EXIT and len(payload) >= 4:
            request.status = struct.unpack_from("<i", payload)[0]
            request.done = True
        elif kind == ERROR:
            code = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
            request.error = (code, payload[4:].decode(errors="replace"))
            request.done = True
        elif kind == FILE_INFO and len(payload) >= FILE_INFO_HEAD.size:
            request.info = FILE_INFO_HEAD.unpack_from(payload)
        elif kind == DATA:
            if payload:
                self._collect(request, "the file", request.data, payload)
            else:
                request.done = True
        elif kind in (OK, PONG):
            request.data.extend(payload)
            request.done = True

    def _collect(self, request: _Request, what: str, buffer: bytearray, payload: bytes,
                 to_sink: bool = True) -> None:
        """Keep ``payload`` (in ``buffer``, or queued for the request's sink), unless it
        takes ``what`` past the request's limit: then the request ends with an error.

        A sink is written by the thread that waits for the request (:meth:`_drain`), not
        here: this runs on the channel's thread, a device thread that the sandbox keeps
        from opening files and that should not wait for a disk. At most MAX_PENDING bytes
        queue up; past that the channel waits until the waiter has written them."""
        sink = request.sink if to_sink else None
        size = (request.sunk if sink is not None else len(buffer)) + len(payload)
        if size > request.limit:
            request.overflow = what
            request.error = (errno_module.EFBIG, f"{what} is larger than {request.limit} "
                                                 f"bytes, the limit")
            request.done = True
            return
        if sink is None:
            buffer.extend(payload)
            return
        request.pending.append(payload)
        request.pending_bytes += len(payload)
        request.sunk = size
        self._cond.notify_all()
        while request.pending_bytes > MAX_PENDING and request.waited and not request.done:
            self._cond.wait(0.25)

    def _drain(self, request: _Request) -> None:
        """Write what :meth:`_collect` queued to the request's sink, without the lock held
        (called with it; the channel goes on meanwhile). A write error ends the request."""
        chunks, request.pending, request.pending_bytes = request.pending, [], 0
        self._cond.notify_all()                 # a channel waiting for room
        error = None
        self._cond.release()
        try:
            for chunk in chunks:
                request.sink.write(chunk)
        except OSError as failure:
            error = (failure.errno or errno_module.EIO,
                     f"writing it on the host: {failure.strerror}")
        finally:
            self._cond.acquire()
        if error is not None and not request.done:
            request.error, request.done = error, True

    def _fail_all(self, message: str) -> None:
        self._broken = message
        for request in self._requests.values():
            if not request.done:
                request.error = (errno_module.EPROTO, message)
                request.done = True
        self._cond.notify_all()

    def close(self, reason: str = "the VM has stopped") -> None:
        """Fail whatever waits: no answer will come any more."""
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    def _send(self, *frames: bytes) -> None:
        with self._send_lock:
            for item in frames:
                self._send_raw(item)

    def _new(self, kind: int, **fields) -> tuple[int, _Request]:
        with self._cond:
            if self._closed:
                raise AgentUnavailable(f"the guest agent cannot answer: {self._closed}")
            request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            request = _Request(kind, **fields)
            self._requests[request_id] = request
            return request_id, request

    def _forget(self, request_id: int) -> None:
        with self._cond:
            request = self._requests.pop(request_id, None)
            if request is not None:
                request.waited = False
                self._cond.notify_all()

    def _wait(self, request: _Request, deadline: float | None, what: str) -> bool:
        """Until ``request`` is done (True) or ``deadline`` passes (False); meanwhile what
        arrives for its sink is written there, on this thread."""
        with self._cond:
            while True:
                if request.pending:
                    self._drain(request)
                    continue
                if request.done:
                    return True
                if self._closed:
                    raise AgentUnavailable(f"{what}: {self._closed}")
                if not self._alive():
                    raise AgentUnavailable(f"{what}: the VM has stopped")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.25 if remaining is None else min(remaining, 0.25))

    def _answer(self, request: _Request, timeout: float | None, what: str, late: str,
                refused: type[RequestRefused] = RequestRefused, subject: str = "") -> None:
        """Wait for the answer to ``request`` (OK, the end of a file): AgentTimeout
        ("``late`` TIMEOUT s") past ``timeout`` seconds; ``refused`` ("guest: ``subject``
        MESSAGE", the guest's errno) when the agent answered ERROR."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait(request, deadline, what):
            raise AgentTimeout(f"{late} {timeout:g} s")
        if request.error is not None:
            code, message = request.error
            raise refused(f"guest: {subject}{message}", code)

    # --- readiness ----------------------------------------------------------------------------------
    def ping(self, timeout: float = 5.0) -> bool:
        """Whether the agent answers a PING within ``timeout`` seconds."""
        request_id, request = self._new(PING)
        try:
            token = os.urandom(8)
            self._send(frame(PING, request_id, token))
            return self._wait(request, time.monotonic() + timeout, "ping") and \
                bytes(request.data) == token
        finally:
            self._forget(request_id)

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Until the agent answers (a booting guest starts it only after its kernel is
        up: minutes on kvm_pvm hosts). AgentUnavailable after ``timeout`` seconds."""
        if self.answered:
            return
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentUnavailable(f"the guest agent did not answer within {timeout:g} s "
                                       f"(does the guest run pykvm-agent? the default guest "
                                       f"starts it with {CMDLINE_FLAG} on its command line)")
            if self.ping(min(remaining, 2.0)):
                return

    def refresh(self, seed: bytes, now_ns: int, *, timeout: float = 60.0) -> None:
        """Make a guest restored from a snapshot fresh (REFRESH): ``seed`` into its
        entropy pool, credited, the CRNG reseeded, its clock set to ``now_ns`` (ns since
        the epoch). RequestRefused with the guest's errno when it could not (ENOSYS from
        an agent older than REFRESH), AgentTimeout past ``timeout`` seconds."""
        request_id, request = self._new(REFRESH)
        try:
            seconds, nanoseconds = divmod(now_ns, 10**9)
            self._send(frame(REFRESH, request_id, struct.pack("<QI", seconds, nanoseconds)
                             + seed))
            self._answer(request, timeout, "refresh", "the guest agent did not refresh within")
        finally:
            self._forget(request_id)

    # --- commands -------------------------------------------------------------------------------------
    def exec(self, command: str | list[str], *, timeout: float | None = None,
             stdin: bytes | None = None, env: dict | None = None, cwd: str | None = None,
             check: bool = False, ready_timeout: float = DEFAULT_READY_TIMEOUT,
             on_output: Callable[[int, bytes], object] | None = None,
             limit: int | None = None, stdout_sink: BinaryIO | None = None) -> Result:
        """Run ``command`` in the guest: a string is a shell command line (/bin/sh -c), a
        list is argv (looked up in PATH). Returns its Result. ``timeout``: seconds the
        command may run; past it the command's process group is killed and
        :class:`AgentTimeout` raised. ``on_output(STDOUT|STDERR, bytes)`` sees output as
        it arrives (on the channel thread). Its stdout and its stderr may each reach
        ``limit`` bytes (default ``max_output``); past it the command is killed and
        :class:`TooMuchOutput` raised. ``stdout_sink``: a binary file its stdout is
        written to instead of Result.stdout."""
        shell = isinstance(command, str)
        argv = [command] if shell else [str(word) for word in command]
        if not argv or not argv[0]:
            raise InvalidRequest("no command to run")
        payload = exec_payload(argv, shell=shell, stdin=stdin is not None, env=env, cwd=cwd)
        self.wait_ready(ready_timeout)
        request_id, request = self._new(EXEC, on_output=on_output, sink=stdout_sink,
                                        limit=self.max_output if limit is None else limit)
        started = time.monotonic()
        try:
            frames = [frame(EXEC, request_id, payload)]
            if stdin is not None:
                frames += data_frames(STDIN, request_id, stdin, end=True)
            self._send(*frames)
            deadline = None if timeout is None else started + timeout
            finished = self._wait(request, deadline, f"`{describe(command)}`")
            if request.overflow is not None:
                self._send(frame(SIGNAL, request_id, struct.pack("<I", signal.SIGKILL)))
                raise TooMuchOutput(f"`{describe(command)}`: its {request.overflow} passed "
                                    f"{request.limit} bytes; it was killed in the guest")
            if not finished:
                self._send(frame(SIGNAL, request_id, struct.pack("<I", signal.SIGKILL)))
                self._wait(request, time.monotonic() + KILL_GRACE, f"`{describe(command)}`")
            with self._cond:
                result = Result(request.status, bytes(request.stdout), bytes(request.stderr),
                                time.monotonic() - started)
                error = request.error
        finally:
            self._forget(request_id)
        if not finished:
            raise AgentTimeout(f"`{describe(command)}` did not finish within {timeout:g} s; "
                               f"it was killed in the guest", result)
        if error is not None:
            raise AgentError(f"`{describe(command)}`: the agent could not run it: "
                             f"{error[1]} (errno {error[0]})")
        if check and result.status != 0:
            raise CommandFailed(command, result)
        return result
