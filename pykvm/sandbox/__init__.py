"""The VMM's sandbox: each pykvm thread confined, once set up, to the system
calls of its role (seccomp filters built by :mod:`.policy`, installed by
:mod:`.seccomp`). The README's "Threat model and sandbox" says what this covers.

The switch is process-wide because filters are: once a thread has one it cannot
be removed, and threads inherit their creator's. ``pykvm run --no-seccomp`` and
:func:`configure(enabled=False) <configure>` turn it off for threads that start
afterwards.
"""

from __future__ import annotations

import importlib
import threading

from .policy import ROLES
from .seccomp import KILL_STATUS, SandboxError, install_filter, thread_filters

__all__ = ["configure", "enabled", "thread_role", "KILL_STATUS", "SandboxError", "ROLES",
           "thread_filters"]

_enabled = True
_programs: dict[str, bytes] = {}
_lock = threading.Lock()

# Modules the confined threads import lazily on rare paths (a snapshot's vCPU state,
# the tracer's guest reads and disassembly): imported before a thread is confined,
# since a confined thread cannot open files. One that is missing (capstone is
# optional) is left to fail where it is used, as it would without a sandbox.
_PRELOAD = ("pykvm.snapshot.kvmstate", "pykvm.guest.code", "pykvm.guest.pagewalk", "capstone")


def configure(*, enabled: bool) -> None:
    """Turn the sandbox on (the default) or off for threads that take a role from now on."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def _program(role: str) -> bytes:
    with _lock:
        if role not in _programs:
            if role not in ROLES:
                raise ValueError(f"unknown thread role {role!r} (known: {', '.join(ROLES)})")
            if not _programs:
                for module in _PRELOAD:
                    try:
                        importlib.import_module(module)
                    except ImportError:
                        pass
            _programs[role] = ROLES[role].program()
        return _programs[role]


def thread_role(role: str) -> None:
    """Confine the calling thread to ``role`` ("vcpu", "device" or "control", see
    :mod:`.policy`) if the sandbox is on. Call it first thing in the thread's run
    function; threads it starts later inherit the filter."""
    if _enabled:
        install_filter(_program(role), role)
