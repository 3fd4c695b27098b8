"""The guest agent's host side: run commands in a running guest and move files in
and out of it, over a dedicated virtio channel.

The channel
-----------
A virtio-serial device (:mod:`pykvm.devices.virtio.ports`: a virtio-console with
VIRTIO_CONSOLE_F_MULTIPORT) with one port named ``org.pykvm.agent.0``. It is not
the guest console: kernel messages and the serial console never mix with it.
In the guest the port is the character device ``/dev/vport<N>p0`` whose
``/sys/class/virtio-ports/vport<N>p0/name`` reads ``org.pykvm.agent.0``;
``pykvm-agent`` (pykvm/guestimage/agent.c, a static C program that the default
guest's /init starts when the kernel command line has ``pykvm.agent=1``) finds
it there and serves the protocol below. ``pykvm run --agent`` (or
``MachineConfig(agent=True)``) adds the device and the command-line word.

Frames
------
Both directions carry the same frames, little-endian::

    offset 0  u16  magic 0x4B50 ("PK")
           2  u8   type
           3  u8   reserved, 0
           4  u32  id        the request it belongs to (chosen by the host; 0: none)
           8  u32  length    payload bytes that follow, at most MAX_PAYLOAD (1 MiB)
          12       payload

Data travels in chunks of at most CHUNK (64 KiB). A receiver that sees a bad
magic or an oversized length has lost the stream; the host then fails every
pending request (AgentError) and the guest agent drops its input up to the
next valid header (magic, a host type 0x01-0x7f, reserved 0). The host sends
only while the agent has its port open (Linux drops data on a closed port).

Host -> guest:

    EXEC      0x01  u32 flags, u32 argc, u32 envc, then argc + envc + 1 NUL-terminated
                    strings: argv..., "NAME=value"..., the working directory ("" = /).
                    flags: 1 SHELL (argv is one command line for /bin/sh -c),
                    2 STDIN (STDIN frames follow; otherwise stdin is /dev/null)
    STDIN     0x02  bytes for the command's stdin; an empty payload closes it
    SIGNAL    0x03  u32 signal number, sent to the command's process group
    PUT_FILE  0x04  u32 mode, path NUL: DATA frames follow, an empty one ends the file;
                    the agent answers OK once it is in place (written to path +
                    ".pykvm-part", then renamed), or ERROR
    GET_FILE  0x05  path NUL: answered by FILE_INFO, DATA frames, an empty DATA; or ERROR
    DATA      0x06  file content (both directions)
    PING      0x07  answered by PONG with the same payload
    REFRESH   0x08  u64 seconds, u32 nanoseconds, then at most 512 bytes of the host's
                    randomness: the agent mixes them into the kernel's input pool,
                    credits them, reseeds the CRNG and sets the wall clock (a guest
                    restored from a cached boot, pykvm/warm/guest.py); OK or ERROR

Guest -> host:

    READY     0x81  u32 protocol version, then text (the agent's name and version);
                    sent when the agent starts
    STDOUT    0x82  bytes the command wrote to stdout
    STDERR    0x83  bytes it wrote to stderr
    EXIT      0x84  i32 status: the exit code; 128 + n when signal n killed it;
                    127 when the program was not found, 126 when it could not be run
    OK        0x85  a PUT_FILE is done
    ERROR     0x86  u32 errno, then a message: the request failed
    FILE_INFO 0x87  u32 mode, u64 size (as stat says; /proc files say 0): before the
                    GET_FILE's DATA frames, which end with an empty one. A directory is
                    an ERROR with EISDIR
    PONG      0x88  the PING's payload

A command's pipes are read until the command exits; what is still in them then
is sent, then EXIT. Output of background processes that outlive the command is
not collected. Commands run in a new session (no controlling tty), in ``/`` by
default, with /init's environment plus the EXEC's. Several commands may run at
once (the agent serves up to 16); this client numbers requests itself.

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
import io
import itertools
import os
import posixpath
import shlex
import signal
import struct
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import PykvmError

PORT_NAME = "org.pykvm.agent.0"
CMDLINE_FLAG = "pykvm.agent=1"
PROTOCOL_VERSION = 1

MAGIC = 0x4B50
HEADER = struct.Struct("<HBBII")
MAX_PAYLOAD = 1 << 20
CHUNK = 64 * 1024

# frame types
EXEC, STDIN, SIGNAL, PUT_FILE, GET_FILE, DATA, PING = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
REFRESH = 0x08
READY, STDOUT, STDERR, EXIT, OK, ERROR, FILE_INFO, PONG = (0x81, 0x82, 0x83, 0x84, 0x85, 0x86,
                                                           0x87, 0x88)
TYPE_NAMES = {EXEC: "EXEC", STDIN: "STDIN", SIGNAL: "SIGNAL", PUT_FILE: "PUT_FILE",
              GET_FILE: "GET_FILE", DATA: "DATA", PING: "PING", REFRESH: "REFRESH",
              READY: "READY",
              STDOUT: "STDOUT", STDERR: "STDERR", EXIT: "EXIT", OK: "OK", ERROR: "ERROR",
              FILE_INFO: "FILE_INFO", PONG: "PONG"}
EXEC_SHELL = 1
EXEC_STDIN = 2

_EXEC_HEAD = struct.Struct("<III")
_FILE_INFO = struct.Struct("<IQ")

KILL_GRACE = 15.0          # seconds to wait for EXIT after the SIGKILL of a timed-out command
# What a guest may send back, bounded (the guest is hostile): a command's stdout and its
# stderr, and a file read into memory, each at most MAX_OUTPUT bytes; a file or directory
# copied out to disk (streamed, never gathered) at most MAX_FILE. AgentClient takes others.
MAX_OUTPUT = 64 << 20
MAX_FILE = 4 << 30
MAX_PENDING = 4 << 20      # bytes on their way to a sink before the channel waits
DEFAULT_READY_TIMEOUT = 900.0


# --- errors ---------------------------------------------------------------------------------------
class AgentError(PykvmError):
    """The guest agent is unreachable, broke the protocol, or refused a request."""


class AgentUnavailable(AgentError):
    """No agent channel, or no agent answered on it."""


class AgentTimeout(AgentError, TimeoutError):
    """A command ran past its timeout; it was killed in the guest (``result`` holds what it
    wrote until then, its status the one the kill produced, or None)."""

    exit_code = 124

    def __init__(self, message: str, result: "Result | None" = None):
        super().__init__(message)
        self.result = result


class RequestRefused(AgentError):
    """The agent answered a request with ERROR (``errno`` is the guest's)."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno


class GuestFileError(RequestRefused):
    """The guest could not read or write a file (``errno`` is the guest's)."""


class TooMuchOutput(AgentError):
    """The guest sent back more than the request's limit; a command was killed for it."""


class CommandFailed(AgentError):
    """``exec(..., check=True)`` and the command's status was not 0."""

    def __init__(self, command, result: "Result"):
        tail = result.stderr[-2000:].decode(errors="replace").strip()
        super().__init__(f"`{describe(command)}` exited with status {result.status}"
                         + (f": {tail}" if tail else ""))
        self.result = result


# --- frames ---------------------------------------------------------------------------------------
def frame(kind: int, request_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, kind, 0, request_id, len(payload)) + payload


def data_frames(kind: int, request_id: int, data: bytes, *, end: bool) -> list[bytes]:
    """``data`` cut into CHUNK-sized frames, plus an empty one when ``end``."""
    view = memoryview(data)
    frames = [frame(kind, request_id, bytes(view[i:i + CHUNK])) for i in range(0, len(view), CHUNK)]
    if end:
        frames.append(frame(kind, request_id))
    return frames


def exec_payload(argv: list[str], *, shell: bool, stdin: bool, env: dict | None = None,
                 cwd: str | None = None) -> bytes:
    env_items = [f"{name}={value}" for name, value in (env or {}).items()]
    strings = [*argv, *env_items, cwd or ""]
    for text in strings:
        if "\0" in text:
            raise ValueError(f"{text!r}: NUL bytes cannot reach the guest")
    for name in (env or {}):
        if not name or "=" in name:
            raise ValueError(f"environment variable name {name!r} is not valid")
    flags = (EXEC_SHELL if shell else 0) | (EXEC_STDIN if stdin else 0)
    return _EXEC_HEAD.pack(flags, len(argv), len(env_items)) + b"".join(
        s.encode() + b"\0" for s in strings)


def parse_exec_payload(payload: bytes) -> tuple[int, list[str], list[str], str]:
    """(flags, argv, env, cwd): the inverse of :func:`exec_payload` (for tests and tools)."""
    flags, argc, envc = _EXEC_HEAD.unpack_from(payload)
    strings = payload[_EXEC_HEAD.size:].split(b"\0")
    if len(strings) != argc + envc + 2 or strings[-1] != b"":
        raise ValueError("EXEC payload: wrong string count")
    text = [s.decode() for s in strings[:-1]]
    return flags, text[:argc], text[argc:argc + envc], text[-1]


class ProtocolError(AgentError):
    """The byte stream is not frames any more."""


class FrameReader:
    """Bytes in, (type, id, payload) frames out; keeps a partial frame for the next feed."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            magic, kind, _, request_id, length = HEADER.unpack_from(self._buffer)
            if magic != MAGIC:
                bad = bytes(self._buffer[:HEADER.size])
                self._buffer.clear()
                raise ProtocolError(f"bad frame header {bad.hex()} (the stream is out of step)")
            if length > MAX_PAYLOAD:
                self._buffer.clear()
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((kind, request_id, bytes(self._buffer[HEADER.size:end])))
            del self._buffer[:end]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)


# --- results ----------------------------------------------------------------------------------------
@dataclass
class Result:
    """What a command did: its exit status (see EXIT above) and its output, separately."""

    status: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def returncode(self) -> int | None:
        """The status, named as in subprocess."""
        return self.status

    @property
    def text(self) -> str:
        """stdout decoded (UTF-8, undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    def as_dict(self) -> dict:
        import base64
        return {"status": self.status, "stdout": base64.b64encode(self.stdout).decode(),
                "stderr": base64.b64encode(self.stderr).decode(),
                "seconds": round(self.seconds, 3)}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        import base64
        return cls(data.get("status"), base64.b64decode(data.get("stdout", "")),
                   base64.b64decode(data.get("stderr", "")), data.get("seconds", 0.0))


def describe(command) -> str:
    return command if isinstance(command, str) else shlex.join(command)


# --- the client -----------------------------------------------------------------------------------------
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


class AgentClient:
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
        elif kind == FILE_INFO and len(payload) >= _FILE_INFO.size:
            request.info = _FILE_INFO.unpack_from(payload)
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
            if not self._wait(request, time.monotonic() + timeout, "refresh"):
                raise AgentTimeout(f"the guest agent did not refresh within {timeout:g} s")
            if request.error is not None:
                code, message = request.error
                raise RequestRefused(f"guest: {message}", code)
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
            raise ValueError("no command to run")
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

    # --- files -------------------------------------------------------------------------------------------
    def put_file(self, guest_path: str, data: bytes, mode: int = 0o644, *,
                 timeout: float | None = 600, ready_timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Write ``data`` to ``guest_path`` (replaced whole, created with ``mode``)."""
        path = _guest_path(guest_path)
        self.wait_ready(ready_timeout)
        request_id, request = self._new(PUT_FILE)
        try:
            self._send(frame(PUT_FILE, request_id, struct.pack("<I", mode & 0o7777)
                             + path.encode() + b"\0"),
                       *data_frames(DATA, request_id, data, end=True))
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self._wait(request, deadline, f"writing {path}"):
                raise AgentTimeout(f"writing {path} in the guest took more than {timeout:g} s")
            if request.error is not None:
                code, message = request.error
                raise GuestFileError(f"guest: {path}: {message}", code)
        finally:
            self._forget(request_id)

    def get_file(self, guest_path: str, *, timeout: float | None = 600,
                 ready_timeout: float = DEFAULT_READY_TIMEOUT,
                 limit: int | None = None) -> tuple[bytes, int]:
        """(content, mode) of the guest's regular file ``guest_path``: at most ``limit``
        bytes (default ``max_output``), else GuestFileError (EFBIG). The mode is what the
        guest says: never apply it to a host file as it is (see :func:`host_mode`)."""
        content = io.BytesIO()
        mode = self.get_file_into(guest_path, content, timeout=timeout,
                                  ready_timeout=ready_timeout,
                                  limit=self.max_output if limit is None else limit)
        return content.getvalue(), mode

    def get_file_into(self, guest_path: str, sink: BinaryIO, *, timeout: float | None = 600,
                      ready_timeout: float = DEFAULT_READY_TIMEOUT,
                      limit: int | None = None) -> int:
        """Write the guest's regular file ``guest_path`` to ``sink`` as it arrives (at most
        ``limit`` bytes, default ``max_file``); returns the mode the guest reports."""
        path = _guest_path(guest_path)
        self.wait_ready(ready_timeout)
        request_id, request = self._new(GET_FILE, sink=sink,
                                        limit=self.max_file if limit is None else limit)
        try:
            self._send(frame(GET_FILE, request_id, path.encode() + b"\0"))
            deadline = None if timeout is None else time.monotonic() + timeout
            if not self._wait(request, deadline, f"reading {path}"):
                raise AgentTimeout(f"reading {path} from the guest took more than {timeout:g} s")
            if request.error is not None:
                code, message = request.error
                raise GuestFileError(f"guest: {path}: {message}", code)
            mode, _ = request.info or (0o644, 0)
            return mode & 0o7777
        finally:
            self._forget(request_id)

    # --- files and directories from and to the host -----------------------------------------------
    def copy_in(self, host_path, guest_path: str, *, timeout: float | None = 600) -> None:
        """Copy the host file or directory ``host_path`` to ``guest_path``. A directory
        goes as a tar stream unpacked by the guest's tar (busybox) into ``guest_path``
        (created if missing): one command, whatever the number of files."""
        source = Path(host_path)
        if source.is_dir():
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for child in sorted(source.iterdir()):
                    tar.add(str(child), arcname=child.name)
            target = shlex.quote(_guest_path(guest_path))
            self.exec(f"mkdir -p {target} && tar -xf - -C {target}", stdin=archive.getvalue(),
                      timeout=timeout, check=True)
            return
        try:
            data = source.read_bytes()
            mode = source.stat().st_mode & 0o7777
        except OSError as error:
            raise GuestFileError(f"{source}: {error.strerror}", error.errno) from None
        self.put_file(guest_path, data, mode, timeout=timeout)

    def copy_out(self, guest_path: str, host_path, *, timeout: float | None = 600,
                 limit: int | None = None) -> None:
        """Copy the guest's file or directory ``guest_path`` to ``host_path``. A directory
        comes as a tar stream from the guest's tar; members that would land outside
        ``host_path`` (absolute paths, ``..``, links out) are refused.

        The guest is hostile: what it sends is streamed to disk and bounded (``limit``
        bytes, default ``max_file``: for a directory, of its tar stream); a file is
        written under a new name in its directory (O_EXCL|O_NOFOLLOW, relative to the
        directory's fd) and renamed over ``host_path``, so a symlink planted there is
        replaced, never followed; modes are the host user's (:func:`host_mode`), never
        the guest's setuid/setgid/sticky bits or owners."""
        path = _guest_path(guest_path)
        limit = self.max_file if limit is None else limit
        target = Path(host_path)
        destination = target / posixpath.basename(path.rstrip("/")) if target.is_dir() \
            else target
        try:
            with NewHostFile(destination) as new:
                mode = self.get_file_into(path, new, timeout=timeout, limit=limit)
                new.commit(mode)
            return
        except GuestFileError as error:
            if error.errno != errno_module.EISDIR:
                raise
        with tempfile.TemporaryFile() as archive:
            self.exec(["tar", "-cf", "-", "-C", path, "."], timeout=timeout, check=True,
                      stdout_sink=archive, limit=limit)
            archive.seek(0)
            try:
                target.mkdir(parents=True, exist_ok=True)
                with tarfile.open(fileobj=archive, mode="r") as tar:
                    tar.extractall(str(target), filter=_host_member)
            except (OSError, tarfile.TarError) as error:
                raise GuestFileError(f"{target}: {getattr(error, 'strerror', None) or error}",
                                     getattr(error, "errno", 0) or 0) from None


class NewHostFile:
    """A host file created for what the guest sends: written under a temporary name in
    the destination's directory (opened as a directory fd; the name created with
    O_CREAT|O_EXCL|O_NOFOLLOW), then renamed over the destination by :meth:`commit`, or
    removed. Nothing is created before the first :meth:`write` or the commit (a guest
    path that turns out to be a directory leaves no trace). Use as a context manager."""

    def __init__(self, destination: Path):
        self.destination = destination
        self.dir_fd = -1
        self.temporary: str | None = None
        self.file: BinaryIO | None = None

    def _create(self) -> None:
        self.dir_fd = os.open(self.destination.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.temporary = f".{self.destination.name}.{os.urandom(6).hex()}.pykvm-part"
        fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self.file is None:
            self._create()
        self.file.write(data)

    def commit(self, guest_mode: int) -> None:
        """Give the file the host user's mode (:func:`host_mode`) and its real name."""
        try:
            if self.file is None:
                self._create()
            self.file.flush()
            os.fchmod(self.file.fileno(), host_mode(guest_mode))
            self.file.close()
            os.rename(self.temporary, self.destination.name, src_dir_fd=self.dir_fd,
                      dst_dir_fd=self.dir_fd)
        except OSError as error:
            raise GuestFileError(f"{self.destination}: {error.strerror}", error.errno) from None
        self.temporary = None

    def __enter__(self) -> "NewHostFile":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.temporary is not None:
            try:
                os.unlink(self.temporary, dir_fd=self.dir_fd)
            except OSError:
                pass
        if self.dir_fd >= 0:
            os.close(self.dir_fd)


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask() sets it, and another
    thread may create a file meanwhile): /proc/self/status has it since Linux 4.7."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def host_mode(guest_mode: int, directory: bool = False) -> int:
    """The host mode for a file the guest sent with ``guest_mode``: the user's own
    (0666, or 0777 when the guest marked it executable, or for a directory, less the
    umask). Setuid, setgid and sticky bits, and the guest's idea of who may read or
    write it, are not the guest's to decide on the host."""
    executable = directory or guest_mode & 0o111
    return (0o777 if executable else 0o666) & ~current_umask()


def _host_member(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (no paths or links outside, no devices, no owners), and
    modes from :func:`host_mode`."""
    member = tarfile.data_filter(member, destination)
    if member.mode is None:
        return member
    return member.replace(mode=host_mode(member.mode, member.isdir()), deep=False)


def _guest_path(path: str) -> str:
    path = str(path)
    if not path or "\0" in path:
        raise ValueError(f"{path!r} is not a guest path")
    return path


# --- the machine's channel ------------------------------------------------------------------------------
def agent_channel(alive: Callable[[], bool] = lambda: True):
    """A virtio-serial device with the agent's port, and the client wired to it."""
    from .devices.virtio.ports import PortsDevice

    client: AgentClient | None = None
    device = PortsDevice([(PORT_NAME, lambda data: client.feed(data))])
    client = AgentClient(lambda data: device.send(0, data), alive=alive)
    return device, client
