"""virtio-rng (virtio 1.x, section 5.4): one queue of device-writable buffers
that the device fills with random bytes from the host (os.urandom)."""

from __future__ import annotations

import os

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

    def __init__(self, source=os.urandom):
        super().__init__()
        self._source = source
        self.bytes_given = 0

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            wanted = min(chain.writable_len, MAX_BYTES_PER_REQUEST)
            written = scatter(chain.writable, self._source(wanted)) if wanted else 0
            self.bytes_given += written
            queue.add_used(chain.head, written)
