"""What can go wrong between pykvm and the guest agent, as typed errors
(pykvm/errors.py's hierarchy: the CLI prints one line, the control socket answers one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import PykvmError
from .result import describe

if TYPE_CHECKING:
    from .result import Result


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


class InvalidRequest(AgentError, ValueError):
    """A request that cannot be put into frames (NUL bytes in a command, an environment
    name with '=', no command at all, a guest path that is empty): the caller's input,
    refused before anything is sent (a ValueError too, as it was before it was typed)."""

    exit_code = 2


class ProtocolError(AgentError):
    """The byte stream is not frames any more."""
