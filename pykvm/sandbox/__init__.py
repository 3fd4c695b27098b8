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
import queue
import sys
import threading

from .policy import ROLES
from .seccomp import KILL_STATUS, SandboxError, install_filter, thread_filters

__all__ = ["configure", "enabled", "thread_role", "import_unconfined", "wait_for_preload",
           "KILL_STATUS", "SandboxError", "ROLES", "thread_filters"]

_enabled = True
_programs: dict[str, bytes] = {}
_lock = threading.Lock()

# Modules the confined threads import lazily (the tracer's guest reads): imported before
# a thread is confined, since a confined thread cannot open files. One that is missing
# (capstone is optional) is left to fail where it is used, as it would without a sandbox.
_PRELOAD = ("pykvm.guest.code", "pykvm.guest.pagewalk")
# ... and those only rarer paths import (kvm_pvm's instruction completions; a snapshot's
# vCPU state): imported by an unconfined thread in the background, off the path to the
# first KVM_RUN (they were ~30 % of a flat guest's start-up, bench/startup.py). Such a
# path calls wait_for_preload() before its import. That thread then stays, waiting to
# import what a confined thread asks for by import_unconfined(): capstone, for the
# message about an instruction nobody completes, is loaded only by a run that needs it
# (its library and engines were ~7.8 MiB of every run's memory, bench/memory.py).
_BACKGROUND_PRELOAD = ("pykvm.quirks.complete", "pykvm.quirks.decode", "pykvm.vstate.kvmstate")
_background: threading.Thread | None = None
_preloaded = threading.Event()
# Set once the thread that started the preload is confined: until then (at most
# PRELOAD_HOLD seconds) the preload waits, as its imports would hold the GIL while that
# thread builds and installs its filter and reaches its first KVM_RUN (bench/startup.py).
_confined = threading.Event()
PRELOAD_HOLD = 1.0
_imports: queue.SimpleQueue = queue.SimpleQueue()     # (module name, [error], done Event)


def configure(*, enabled: bool) -> None:
    """Turn the sandbox on (the default) or off for threads that take a role from now on."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    return _enabled


def _import_all(modules: tuple[str, ...]) -> None:
    for module in modules:
        for _attempt in range(3):
            try:
                importlib.import_module(module)
            except ImportError:
                break
            except SystemError:
                # CPython 3.11's AST recursion counter is not thread-safe: compiling a module
                # here while another thread compiles one can fail with "AST constructor
                # recursion depth mismatch" (seen in pytest). The module is unharmed: retry.
                continue
            break


def _preload_and_serve() -> None:
    """The unconfined helper thread: the background preload, then imports on request."""
    _confined.wait(PRELOAD_HOLD)
    _import_all(_BACKGROUND_PRELOAD)
    _preloaded.set()
    while True:
        module, error, done = _imports.get()
        try:
            importlib.import_module(module)
        except Exception as failure:        # ImportError, or the library's own failure
            error.append(failure)
        done.set()


def wait_for_preload(timeout: float = 60.0) -> None:
    """Return once the background preload is done: call it before a rare path's lazy
    import on a thread that may be confined (it cannot import on its own)."""
    thread = _background
    if thread is not None and thread is not threading.current_thread():
        _preloaded.wait(timeout)


def import_unconfined(module: str, timeout: float = 60.0):
    """``module``, imported by the sandbox's unconfined helper thread when the sandbox
    is on (a confined thread cannot open files, so it cannot import anything new), by
    the caller otherwise. ImportError when it cannot be imported."""
    if module in sys.modules:
        return sys.modules[module]
    thread = _background
    if thread is None or thread is threading.current_thread():
        return importlib.import_module(module)
    error: list[Exception] = []
    done = threading.Event()
    _imports.put((module, error, done))
    if not done.wait(timeout):
        raise ImportError(f"{module}: the sandbox's helper did not import it in {timeout:g} s")
    if error:
        raise ImportError(f"{module}: {error[0]}") from error[0]
    return sys.modules[module]


def _program(role: str) -> bytes:
    global _background
    with _lock:
        if role not in _programs:
            if role not in ROLES:
                raise ValueError(f"unknown thread role {role!r} (known: {', '.join(ROLES)})")
            if not _programs:
                _import_all(_PRELOAD)
                # Started before the caller confines itself, so it is not confined.
                # Published only once started: wait_for_preload() reads it without the
                # lock, and joining a thread that is not started yet raises RuntimeError.
                preload = threading.Thread(target=_preload_and_serve, name="sandbox-preload",
                                           daemon=True)
                preload.start()
                _background = preload
            _programs[role] = ROLES[role].program()
        return _programs[role]


def thread_role(role: str) -> None:
    """Confine the calling thread to ``role`` ("vcpu", "device" or "control", see
    :mod:`.policy`) if the sandbox is on. Call it first thing in the thread's run
    function; threads it starts later inherit the filter."""
    if _enabled:
        install_filter(_program(role), role)
        _confined.set()
