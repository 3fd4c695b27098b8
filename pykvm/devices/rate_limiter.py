"""Token buckets: how fast a guest may make a device work (Firecracker's rate limiter,
``src/vmm/src/rate_limiter``, whose API fields these are).

A :class:`TokenBucket` holds up to ``size`` tokens and refills completely in
``refill_time_ms`` (a steady ``size / refill_time`` per millisecond); ``one_time_burst``
tokens more are available once, at the start, and never come back. A bucket of size 0
or refill time 0 limits nothing, as in Firecracker.

A :class:`RateLimiter` has one bucket for bytes (``bandwidth``) and one for requests
(``ops``). A device asks :meth:`RateLimiter.ready` *before* it takes a request off its
queue, and :meth:`RateLimiter.charge` what the request cost afterwards: the cost may
take a bucket below zero (a request larger than the bucket still runs, once the bucket
is positive), and the device waits :meth:`RateLimiter.wait_s` before the next one. So
a throttled device never holds a request it took: nothing is in flight that a snapshot
would have to carry, and the guest's buffers stay in its ring until they are served.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import sandbox


@dataclass
class TokenBucket:
    size: int
    refill_time_ms: int
    one_time_burst: int = 0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.size < 0 or self.refill_time_ms < 0 or self.one_time_burst < 0:
            raise ValueError("token bucket sizes and times are never negative")
        self._budget = float(self.size)
        self._burst = float(self.one_time_burst)
        self._last = self.clock()

    @property
    def unlimited(self) -> bool:
        return self.size == 0 or self.refill_time_ms == 0

    def _refill(self) -> None:
        now = self.clock()
        rate = self.size / (self.refill_time_ms / 1000.0)      # tokens per second
        self._budget = min(float(self.size), self._budget + (now - self._last) * rate)
        self._last = now

    def ready(self) -> bool:
        if self.unlimited:
            return True
        self._refill()
        return self._burst > 0 or self._budget > 0

    def charge(self, tokens: int) -> None:
        """Take ``tokens`` (the one-time burst first); the budget may go below zero."""
        if self.unlimited or tokens <= 0:
            return
        self._refill()
        from_burst = min(self._burst, tokens)
        self._burst -= from_burst
        self._budget -= tokens - from_burst

    def wait_s(self) -> float:
        """Seconds until :meth:`ready` (0.0 if it is)."""
        if self.ready():
            return 0.0
        rate = self.size / (self.refill_time_ms / 1000.0)
        return (-self._budget) / rate + 1e-3


class RateLimiter:
    """Bytes and requests; either bucket may be None (not limited). Thread-safe."""

    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None):
        self.buckets = [b for b in (bandwidth, ops) if b is not None and not b.unlimited]
        self.bandwidth, self.ops = bandwidth, ops
        self._lock = threading.Lock()
        self.throttled = 0            # how often a request had to wait

    def ready(self) -> bool:
        with self._lock:
            ok = all(bucket.ready() for bucket in self.buckets)
            self.throttled += not ok
            return ok

    def charge(self, nbytes: int, ops: int = 1) -> None:
        with self._lock:
            if self.bandwidth is not None:
                self.bandwidth.charge(nbytes)
            if self.ops is not None:
                self.ops.charge(ops)

    def wait_s(self) -> float:
        with self._lock:
            return max((bucket.wait_s() for bucket in self.buckets), default=0.0)


def parse_rate_limit(text: str) -> RateLimiter | None:
    """``bandwidth=SIZE:REFILL_MS[:BURST],ops=SIZE:REFILL_MS[:BURST]`` (either part may
    be left out; "" is no limiter), e.g. ``bandwidth=1048576:1000`` for 1 MiB/s.
    ValueError (one line) for anything else. The text form is what a MachineConfig and
    a snapshot keep (format_rate_limit writes it)."""
    if not text:
        return None
    buckets: dict[str, TokenBucket] = {}
    for part in text.split(","):
        name, sep, numbers = part.partition("=")
        values = numbers.split(":")
        if name not in ("bandwidth", "ops") or not sep or name in buckets or \
                not 2 <= len(values) <= 3 or not all(v.isdigit() and len(v) <= 19
                                                      for v in values):
            raise ValueError(f"rate limit {text[:80]!r}: use bandwidth=SIZE:REFILL_MS[:BURST],"
                             f"ops=SIZE:REFILL_MS[:BURST]")
        size, refill, *burst = (int(v) for v in values)
        buckets[name] = TokenBucket(size, refill, burst[0] if burst else 0)
    return RateLimiter(**buckets)


def format_rate_limit(bandwidth: tuple[int, int, int] | None,
                      ops: tuple[int, int, int] | None) -> str:
    """The text :func:`parse_rate_limit` reads, of (size, refill_time_ms, burst) pairs."""
    return ",".join(f"{name}={size}:{refill}:{burst}" for name, bucket in
                    (("bandwidth", bandwidth), ("ops", ops)) if bucket is not None
                    for size, refill, burst in [bucket])


class DelayedKick:
    """One thread that calls ``kick()`` once, ``delay`` seconds after :meth:`schedule`
    (a throttled device's wake-up); a schedule while one is pending keeps the earlier."""

    def __init__(self, kick: Callable[[], None], name: str):
        self._kick = kick
        self._cond = threading.Condition()
        self._due: float | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def schedule(self, delay: float) -> None:
        with self._cond:
            due = time.monotonic() + delay
            if self._due is None or due < self._due:
                self._due = due
                self._cond.notify()

    def _run(self) -> None:
        sandbox.thread_role("device")
        while True:
            with self._cond:
                while not self._stopping and (self._due is None or
                                              time.monotonic() < self._due):
                    self._cond.wait(None if self._due is None else
                                    max(0.0, self._due - time.monotonic()))
                if self._stopping:
                    return
                self._due = None
            self._kick()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
