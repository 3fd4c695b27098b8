"""The control socket's client: one request, one response (``pykvm ctl``, ``pykvm
stat``, ``pykvm exec``, ``pykvm cp``, and tests and scripts)."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

from ..errors import ConfigError
from .protocol import ACTIONS, MAX_RESPONSE, ControlError


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
