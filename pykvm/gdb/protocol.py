"""The GDB Remote Serial Protocol's framing: packets, checksums, escapes, acks.

GDB manual, "Overview" (Appendix E.1): a packet is ``$data#cc``, ``cc`` the two hex
digits of the sum of ``data``'s bytes modulo 256; the receiver answers ``+`` (good)
or ``-`` (send again) until "Packet Acknowledgment" (E.11) turns that off with
``QStartNoAckMode``. ``#``, ``$``, ``}`` and ``*`` inside data are sent as ``}``
followed by the byte XOR 0x20 ("Binary Data"), and a lone 0x03 byte outside a
packet is Ctrl-C ("Interrupts", E.9).

The peer is untrusted (with TCP, any local user), so everything it can make the
stub hold is bounded: a packet longer than the ``PacketSize`` the stub announced in
``qSupported`` ("General Query Packets") ends the connection instead of growing a
buffer, and so do endless ``-`` replies. A malformed checksum is a bad checksum.
"""

from __future__ import annotations

import select
import socket

from ..errors import GdbProtocolError

PACKET_SIZE = 0x4000      # announced as qSupported's PacketSize; the largest packet taken
CTRL_C = 0x03
MAX_RETRIES = 10          # '-' replies to one packet (or bad checksums in a row) tolerated
_ESCAPED = (0x23, 0x24, 0x7D, 0x2A)   # # $ } *


def escape(data: bytes) -> bytes:
    """``data`` as packet contents ("Binary Data")."""
    out = bytearray()
    for byte in data:
        if byte in _ESCAPED:
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Packet contents back to the bytes gdb meant."""
    out = bytearray()
    escaped = False
    for byte in data:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == 0x7D:
            escaped = True
        else:
            out.append(byte)
    return bytes(out)


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def frame(payload: str | bytes) -> bytes:
    """``$data#cc`` for ``payload`` (str: latin-1, one byte per character)."""
    data = escape(payload.encode("latin-1") if isinstance(payload, str) else payload)
    return b"$" + data + b"#" + checksum(data)


class Connection:
    """One gdb client's byte stream: packets in and out, acks while they are on."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.no_ack = False
        self._buffer = bytearray()

    def recv_byte(self, timeout: float | None = None) -> int | None:
        """The next byte; None when ``timeout`` passes first. Raises ConnectionError at
        the end of the stream."""
        if not self._buffer:
            if timeout is not None:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    return None
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("gdb closed the connection")
            self._buffer += data
        byte = self._buffer[0]
        del self._buffer[0]
        return byte

    def read_packet(self) -> str:
        """The next packet's contents (latin-1), or "\\x03" for a Ctrl-C between
        packets. A packet with a bad checksum is refused with ``-`` and read again."""
        for _ in range(MAX_RETRIES):
            while (byte := self.recv_byte()) != ord("$"):
                if byte == CTRL_C:
                    return "\x03"
            data = bytearray()
            while (byte := self.recv_byte()) != ord("#"):
                if len(data) >= PACKET_SIZE:
                    raise GdbProtocolError(f"gdb sent a packet over {PACKET_SIZE} bytes")
                data.append(byte)
            given = bytes((self.recv_byte(), self.recv_byte()))
            if self.no_ack:
                return unescape(bytes(data)).decode("latin-1")
            good = given.lower() == checksum(data)
            self.sock.sendall(b"+" if good else b"-")
            if good:
                return unescape(bytes(data)).decode("latin-1")
        raise GdbProtocolError(f"{MAX_RETRIES} packets in a row with a bad checksum")

    def send(self, payload: str | bytes) -> None:
        """Send one packet; while acks are on, again on ``-`` (Ctrl-C bytes skipped)."""
        packet = frame(payload)
        for _ in range(MAX_RETRIES):
            self.sock.sendall(packet)
            if self.no_ack:
                return
            while (byte := self.recv_byte()) not in (ord("+"), ord("-")):
                pass
            if byte == ord("+"):
                return
        raise GdbProtocolError("gdb keeps rejecting a packet")
