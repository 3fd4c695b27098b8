"""The answer to one cross-thread request to a vCPU thread (pykvm/vstate/vcpu.py,
``Vcpu.call``): a value or the exception to re-raise, handed from the vCPU thread to the
caller.

concurrent.futures.Future did this; importing that package cost every run ~1-2 ms before
its first KVM_RUN (bench/startup.py), and a request needs none of its cancellation,
callbacks or executors.
"""

from __future__ import annotations

import threading


class Reply:
    """One request's answer: set once by the vCPU thread, waited for by the caller."""

    __slots__ = ("_done", "_value", "_error")

    def __init__(self):
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def set_result(self, value: object) -> None:
        self._value = value
        self._done.set()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def result(self, timeout: float | None):
        """The value, or the vCPU thread's exception raised here; TimeoutError when the
        vCPU thread has not answered within ``timeout`` seconds (None: wait for it)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the vCPU thread did not answer within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value
