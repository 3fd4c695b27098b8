"""A virtio queue's rate limiter: Firecracker's ``rate_limiter`` (and a NIC's
``rx_rate_limiter``/``tx_rate_limiter``) on pykvm's own virtio-blk and virtio-net.

The buckets are pykvm/devices/rate_limiter.py's. A device asks :meth:`QueueThrottle.admit`
before it takes the next request off its queue (or, for a NIC's receive side, before
it reads the next frame from its back end); when the buckets are empty the request is
left where it is -- in the guest's ring, or in the TAP's or socket's queue, which the
kernel bounds -- and one :class:`~pykvm.devices.rate_limiter.DelayedKick` wakes the
queue when the buckets have refilled: no busy loop, no host-side queue that grows.
:meth:`charge` takes what the request cost (its data bytes, one op) afterwards.

:meth:`update` is Firecracker's PATCH semantics (``BucketUpdate``): a bucket that is
given replaces the old one (size or refill_time 0 removes it), one that is not keeps
its state. The limiter object is swapped whole, so the queue worker, which reads it
once per call, never sees half an update.
"""

from __future__ import annotations

from typing import Callable

from ..rate_limiter import DelayedKick, RateLimiter, TokenBucket

KEEP = object()       # update(): this bucket is not changed


class QueueThrottle:
    """The limiter of one queue of one device; ``kick`` re-runs that queue."""

    def __init__(self, kick: Callable[[], None], name: str):
        self._kick = kick
        self._name = name
        self.limiter: RateLimiter | None = None
        self._wake: DelayedKick | None = None
        self.throttled = False
        self.waits = 0                # how often the queue had to wait for tokens

    def set(self, limiter: RateLimiter | None) -> None:
        """Replace the limiter (None or one with no bucket: no limit)."""
        if limiter is not None and not limiter.buckets:
            limiter = None
        if limiter is not None and self._wake is None:
            self._wake = DelayedKick(self._kick, self._name)
        was_throttled, self.limiter = self.throttled, limiter
        if was_throttled and limiter is None:
            self.throttled = False
            self._kick()              # what waited for tokens goes now

    def update(self, bandwidth=KEEP, ops=KEEP) -> None:
        """PATCH: each given bucket (a TokenBucket, or None to remove it) replaces the
        current one; KEEP leaves it, with its tokens, as it is."""
        old = self.limiter
        keep_bw = old.bandwidth if old is not None else None
        keep_ops = old.ops if old is not None else None
        self.set(RateLimiter(bandwidth=keep_bw if bandwidth is KEEP else bandwidth,
                             ops=keep_ops if ops is KEEP else ops))
        if self.throttled:
            self._kick()              # the new buckets may allow it at once

    def admit(self) -> bool:
        """May the queue take its next request now? If not, its wake-up is scheduled."""
        limiter = self.limiter
        if limiter is None or limiter.ready():
            self.throttled = False
            return True
        self.throttled = True
        self.waits += 1
        self._wake.schedule(limiter.wait_s())
        return False

    def charge(self, nbytes: int, ops: int = 1) -> None:
        limiter = self.limiter
        if limiter is not None:
            limiter.charge(nbytes, ops)

    def close(self) -> None:
        if self._wake is not None:
            self._wake.close()
            self._wake = None


def bucket(size: int, refill_time_ms: int, one_time_burst: int = 0) -> TokenBucket | None:
    """A bucket from Firecracker's fields; None when it limits nothing (size or
    refill_time 0, Firecracker's way of turning one off)."""
    if size == 0 or refill_time_ms == 0:
        return None
    return TokenBucket(size, refill_time_ms, one_time_burst)
