"""The guest agent's host side: run commands in a running guest and move files in
and out of it, over a dedicated virtio channel (the guest side is
pykvm/guestimage/agent.c, ``pykvm-agent``).

One module per concern:

- protocol.py: the frames both sides speak, their types and bounds (the format is
  documented there);
- client.py: :class:`AgentClient`, transport-neutral (a ``send`` callable out,
  :meth:`AgentClient.feed` in), thread-safe, every wait bounded;
- files.py: its file requests and the host files the guest's data lands in
  (O_EXCL|O_NOFOLLOW under a directory fd, the user's modes, never the guest's);
- result.py: :class:`Result`, what a command did; errors.py: the typed errors;
- channel.py: :func:`agent_channel`, the virtio-serial device and its client as a
  machine adds them (``pykvm run --agent``).

Every public name is importable from ``pykvm.agent`` as before the split, each
module loaded when first named (pykvm/lazy.py).
"""

from ..lazy import lazy_exports

_EXPORTS = {
    **{name: ".protocol" for name in (
        "PORT_NAME", "CMDLINE_FLAG", "PROTOCOL_VERSION", "MAGIC", "HEADER", "MAX_PAYLOAD", "CHUNK",
        "DEFAULT_READY_TIMEOUT", "EXEC", "STDIN", "SIGNAL", "PUT_FILE", "GET_FILE", "DATA", "PING",
        "REFRESH", "READY", "STDOUT", "STDERR", "EXIT", "OK", "ERROR", "FILE_INFO", "PONG",
        "TYPE_NAMES", "EXEC_SHELL", "EXEC_STDIN", "EXEC_HEAD", "FILE_INFO_HEAD", "frame",
        "data_frames", "exec_payload", "parse_exec_payload", "FrameReader")},
    **{name: ".errors" for name in (
        "AgentError", "AgentUnavailable", "AgentTimeout", "RequestRefused", "GuestFileError",
        "TooMuchOutput", "CommandFailed", "InvalidRequest", "ProtocolError")},
    **{name: ".result" for name in ("Result", "describe")},
    **{name: ".client" for name in ("AgentClient", "KILL_GRACE", "MAX_OUTPUT", "MAX_FILE",
                                    "MAX_PENDING")},
    **{name: ".files" for name in ("FileRequests", "NewHostFile", "current_umask", "host_mode")},
    "agent_channel": ".channel",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
