"""The guest agent's protocol: frames on a dedicated virtio channel, the same in both
directions; pykvm/guestimage/agent.c is the other end.

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
"""

from __future__ import annotations

import struct

from .errors import InvalidRequest, ProtocolError

PORT_NAME = "org.pykvm.agent.0"
CMDLINE_FLAG = "pykvm.agent=1"
PROTOCOL_VERSION = 1

MAGIC = 0x4B50
HEADER = struct.Struct("<HBBII")
MAX_PAYLOAD = 1 << 20
CHUNK = 64 * 1024
DEFAULT_READY_TIMEOUT = 900.0    # seconds for a booting guest's agent to answer (minutes on kvm_pvm)

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

EXEC_HEAD = struct.Struct("<III")
FILE_INFO_HEAD = struct.Struct("<IQ")


def frame(kind: int, request_id: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise InvalidRequest(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
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
            raise InvalidRequest(f"{text!r}: NUL bytes cannot reach the guest")
    for name in (env or {}):
        if not name or "=" in name:
            raise InvalidRequest(f"environment variable name {name!r} is not valid")
    flags = (EXEC_SHELL if shell else 0) | (EXEC_STDIN if stdin else 0)
    return EXEC_HEAD.pack(flags, len(argv), len(env_items)) + b"".join(
        s.encode() + b"\0" for s in strings)


def parse_exec_payload(payload: bytes) -> tuple[int, list[str], list[str], str]:
    """(flags, argv, env, cwd): the inverse of :func:`exec_payload` (for tests and tools)."""
    flags, argc, envc = EXEC_HEAD.unpack_from(payload)
    strings = payload[EXEC_HEAD.size:].split(b"\0")
    if len(strings) != argc + envc + 2 or strings[-1] != b"":
        raise ProtocolError("EXEC payload: wrong string count")
    text = [s.decode() for s in strings[:-1]]
    return flags, text[:argc], text[argc:argc + envc], text[-1]


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
