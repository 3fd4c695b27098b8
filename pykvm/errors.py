"""pykvm's exception hierarchy.

Library code raises these; only the CLI turns them into one-line messages and
exit codes. Each class says *what kind* of problem it is so that callers (and
the CLI) can react without parsing messages.
"""


class PykvmError(Exception):
    """Base of every error pykvm raises on purpose."""

    exit_code = 1


class KvmUnavailable(PykvmError):
    """/dev/kvm is missing, not accessible, or speaks the wrong API."""


class NotKvmDevice(KvmUnavailable):
    """The device the user named is not KVM (``--device /dev/null``): a bad option."""

    exit_code = 2


class KvmError(PykvmError):
    """An ioctl on a KVM fd failed; carries the request name and errno."""

    def __init__(self, request: str, errno_: int, detail: str = ""):
        import os

        self.request = request
        self.errno = errno_
        message = f"{request} failed: {os.strerror(errno_)} (errno {errno_})"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class ConfigError(PykvmError):
    """The user asked for something invalid (a size, a path, an option)."""

    exit_code = 2


class HostResourceError(ConfigError):
    """The host cannot give what the user asked for (more guest RAM than it can map)."""


class ImageError(PykvmError):
    """A kernel, initrd, flat binary or disk image is missing or malformed."""

    exit_code = 2


class GuestBuildError(PykvmError):
    """The default Linux guest cannot be built (missing packages, a failed step) or is not
    built yet; the message says what to run."""


class BootCacheError(PykvmError):
    """The boot cache (pykvm/warm/cache.py) cannot be used: its directory is not safely
    this user's, or an entry cannot be written or read."""


class RefreshFailed(PykvmError):
    """A guest restored from the boot cache could not be made fresh (reseeded, its clock
    set): it is not used, and the run boots cold."""


class SnapshotError(PykvmError):
    """A snapshot cannot be taken, or a snapshot directory cannot be restored. For the
    CLI it is bad input like a bad image or option (exit status 2): the snapshot, the
    directory or the host resources given for it are at fault, not pykvm."""

    exit_code = 2


class GuestMemoryError(PykvmError):
    """A guest-physical access fell outside guest RAM."""


class GuestCrashed(PykvmError):
    """The guest stopped in a way it cannot continue from (triple fault, entry failure)."""


class StatsDecodeError(PykvmError):
    """Statistics another pykvm sent (`pykvm stat` over a control socket) are malformed."""


class VhostUserError(PykvmError):
    """A vhost-user back end (pykvm/vhost_user) broke the protocol, refused a request,
    went away, or could not be started."""


class GdbProtocolError(PykvmError):
    """A gdb client broke the Remote Serial Protocol (a packet over the size the stub
    announced, acknowledgements refused without end): the stub drops that connection
    (pykvm/gdb/protocol.py)."""


def first_line(error: BaseException) -> str:
    """The one line a front end (`pykvm`, `pykvm-firecracker`, a boot-cache warning)
    prints for ``error``: its message's first line, or its class name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class GuestBootFailed(PykvmError):
    """A guest did not reach its ready point (its agent answering): the message has the
    cause and the tail of its console (the pytest plugin's ``linux_vm``)."""
