"""virtio-rng (virtio 1.x, section 5.4): one queue of device-writable buffers
that the device fills with random bytes from the host (os.urandom).

With a :class:`~pykvm.devices.rate_limiter.RateLimiter` (Firecracker's PUT /entropy
``rate_limiter``) the device takes a request off the queue only while the limiter is
ready, charges it the bytes it gave, and otherwise leaves the guest's buffers in the
ring and wakes itself when the buckets have refilled (DelayedKick): nothing is held
between requests, so a snapshot never has a request in flight.
"""

from __future__ import annotations

import os

from ..rate_limiter import DelayedKick, RateLimiter
from .device import VIRTIO_ID_RNG, VirtioDevice
from .queue import Virtqueue, scatter

QUEUE_SIZE = 64
# A request may offer more; filling up to this much is enough for any guest and
# keeps one hostile gigabyte-sized request from tying up the host thread.
MAX_BYTES_PER_REQUEST = 64 * 1024


class RngDevice(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, source=os.urandom, rate_limiter: RateLimiter | None = None):
        super().__init__()
        self._source = source
        self.bytes_given = 0
        self.rate_limiter: RateLimiter | None = None
        self._wake: DelayedKick | None = None
        self._throttled = False
        self.limit(rate_limiter)

    def limit(self, rate_limiter: RateLimiter | None) -> None:
        """Serve requests within ``rate_limiter`` (before the device runs)."""
        if rate_limiter is not None and rate_limiter.buckets and self._wake is None:
            self._wake = DelayedKick(lambda: self.kick(0), "virtio-rng-limit")
        self.rate_limiter = rate_limiter if rate_limiter and rate_limiter.buckets else None

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        limiter = self.rate_limiter
        while queue.has_available():
            if limiter is not None and not limiter.ready():
                self._throttled = True
                self._wake.schedule(limiter.wait_s())
                return
            self._throttled = False
            chain = queue.pop()
            if chain is None:
                return
            wanted = min(chain.writable_len, MAX_BYTES_PER_REQUEST)
            written = scatter(chain.writable, self._source(wanted)) if wanted else 0
            self.bytes_given += written
            if limiter is not None:
                limiter.charge(written, 1)
            queue.add_used(chain.head, written)

    def wants_more(self, index: int) -> bool:
        return not self._throttled       # throttled: the DelayedKick wakes the queue

    def close(self) -> None:
        if self._wake is not None:
            self._wake.close()
