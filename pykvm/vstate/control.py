"""The stop/pause channel a VM and its vCPUs share.

A vCPU asks for a stop (the guest halted, reset, crashed) and waits while the VM is
paused; the VM (or gdb, the control socket, a signal handler) asks for a stop, pauses
and resumes. Both sides hold this one object instead of reaching into each other
(Firecracker's vstate/vcpu.rs does the same with its event channels). Every method is
safe from any thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from ..errors import GuestCrashed, PykvmError


@dataclass
class Stop:
    """Why a VM stopped, and the exit status pykvm's CLI reports for it."""

    kind: str          # "exit", "poweroff", "reset", "halt", "crash", "error", "signal", "user"
    status: int
    message: str
    error: PykvmError | None = None

    @classmethod
    def for_error(cls, error: PykvmError) -> "Stop":
        """A crash (status 3) for a GuestCrashed, an error with its exit code otherwise."""
        if isinstance(error, GuestCrashed):
            return cls("crash", 3, str(error), error)
        return cls("error", error.exit_code, str(error), error)


class Kickable(Protocol):
    """A member of the channel: a vCPU, kicked out of KVM_RUN when a stop is asked."""

    thread: threading.Thread | None

    def kick(self) -> None: ...


class RunControl:
    """Stop requests (the first reason wins) and the pause gate vCPU threads wait at."""

    def __init__(self):
        self.stop_requested = False
        self.stop_reason: Stop | None = None
        self.stopped = threading.Event()
        self.paused = False
        self.lock = threading.Condition()      # guards paused and the stop fields
        self._members: list[Kickable] = []

    def join(self, member: Kickable) -> None:
        self._members.append(member)

    def kick_all(self) -> None:
        for member in self._members:
            member.kick()

    def request_stop(self, stop: Stop) -> None:
        """Stop every member: the first reason given wins."""
        with self.lock:
            if self.stop_reason is None:
                self.stop_reason = stop
            self.stop_requested = True
            self.paused = False
            self.lock.notify_all()
        for member in self._members:
            if member.thread is not threading.current_thread():
                member.kick()
        self.stopped.set()

    def request_stop_error(self, error: PykvmError) -> None:
        self.request_stop(Stop.for_error(error))

    def set_paused(self, paused: bool) -> None:
        with self.lock:
            self.paused = paused
            self.lock.notify_all()

    def wake_paused(self) -> None:
        """Let paused vCPU threads serve a queued request (Vcpu.call) at once."""
        if self.paused:
            with self.lock:
                self.lock.notify_all()

    def wait_while_paused(self, serve: Callable[[], None]) -> None:
        """On a vCPU thread: block while paused, calling ``serve`` (its queued requests)
        each time it is woken or every half second."""
        if not self.paused:
            return
        with self.lock:
            while self.paused and not self.stop_requested:
                self.lock.wait(0.5)
                serve()
