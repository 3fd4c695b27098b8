"""Network namespaces by name: ``netns=NS`` of ``--net tap`` (/run/netns/NS, as
`ip netns add` makes them).

setns(2) with CLONE_NEWNET moves only the calling thread, so :func:`entered_netns`
runs one block of the TAP's plumbing inside the namespace and comes back; pykvm's
other threads never leave their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from ..errors import ConfigError
from ..ioctl.call import libc

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_setns = libc.setns
_setns.argtypes = (ctypes.c_int, ctypes.c_int)
_setns.restype = ctypes.c_int


def open_netns(name: str | None) -> int:
    """An fd of the named namespace, or of this thread's own when ``name`` is None."""
    path = "/proc/thread-self/ns/net" if name is None else os.path.join(NETNS_DIR, name)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"network namespace {name!r} does not exist (create it with "
                          f"`ip netns add {name}`)") from None
    except OSError as error:
        raise ConfigError(f"cannot open network namespace {name!r}: {error.strerror}") from None


@contextlib.contextmanager
def entered_netns(fd: int):
    """Run the body with this thread in the network namespace ``fd``; back after it.
    (setns acts on the calling thread only: pykvm's other threads are not moved.)"""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(own).st_ino == os.fstat(fd).st_ino:
            yield
            return
        if _setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ConfigError(f"cannot enter the network namespace: {os.strerror(err)}")
        try:
            yield
        finally:
            if _setns(own, CLONE_NEWNET) != 0:   # pragma: no cover - cannot fail for our own ns
                raise OSError(ctypes.get_errno(), "setns back to pykvm's namespace failed")
    finally:
        os.close(own)
