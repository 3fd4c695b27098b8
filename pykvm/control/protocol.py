"""The control socket's wire format: one JSON request per line, one JSON response per
line, bounded whatever a client sends.

A request line is at most MAX_REQUEST bytes (a longer one is refused whole and the
connection closed, so no tail of it is read as a request); its nesting is checked
before the parser recurses (MAX_DEPTH) and its integers before int() sees them
(MAX_INT_DIGITS: CPython's int() is quadratic in the digits). A client reads at most
MAX_RESPONSE bytes of one response. The actions are listed here because the server
dispatches on them and ``pykvm ctl`` checks its words against them.
"""

from __future__ import annotations

import json
import socket

from ..errors import PykvmError, first_line

MAX_REQUEST = 1 << 16       # bytes in one request line, newline excluded
MAX_DEPTH = 32              # nesting of arrays and objects in a request
MAX_INT_DIGITS = 32         # digits of a JSON integer (CPython's int() is quadratic past ~4300)
MAX_RESPONSE = 1 << 30      # what a client reads of one response (exec output included)
ACTIONS = ("status", "pause", "resume", "snapshot", "stats", "stop", "exec", "copy_in",
           "copy_out")
# Guest-agent requests (pykvm/agent/) take as long as the guest needs: they do not hold
# the lock that orders state changes, so pause, snapshot and stop are served meanwhile.
UNLOCKED_ACTIONS = ("exec", "copy_in", "copy_out")


class ControlError(PykvmError):
    """The control socket cannot be served, reached, or answered a request with an error."""


class RequestTooLong(ControlError):
    """A request line longer than MAX_REQUEST: the connection is closed after the answer."""


def send_line(connection: socket.socket, response: dict) -> bool:
    try:
        connection.sendall(json.dumps(response).encode() + b"\n")
    except OSError:
        return False
    return True


class LineReader:
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
