"""bench/blk.py's C reference device (``--backend c``): the floor of pykvm's
virtio-blk request path on this host, with no Python in it.

The VM, the guest (bench/guests/blk_loop.S), the virtio-pci function and the
driver's probe are blk.py's, exactly as for pykvm's own device; only the queue is
served by another thread: bench/c/blk_serve.c on the ring loop of bench/c/virtq.h
(cqueue.py builds and runs it). It sleeps in poll() on the doorbell's ioeventfd --
the same KVM ioeventfd path as pykvm's worker, which is taken off the doorbell --
serves the split ring with preadv/pwritev straight between the image and guest RAM,
honours EVENT_IDX, and signals one eventfd per pass when the driver asked for an
interrupt: the MSI-X vector's irqfd (``--spin --msix``), or else the eventfd the
bench's wait register blocks on (:class:`flatguest.EventfdWaiter`, the same one
exit per wait as pykvm's INTx path, without the Python INTx/ISR steps in between).

What differs from pykvm's device, then, is the Python of the request path and of
its wake-ups (the worker's poll loop, ``serve_queue``, ``pop``/``handle``/
``add_used``, the INTx line's ``Event.set``); what stays is the host's part: the
ioeventfd, the thread wake-ups, preadv, the irqfd, the vCPU's exits.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from cqueue import CQueue
from flatguest import EventfdWaiter

from pykvm.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice

SECTOR = 512


class CBlockDevice(VirtioDevice):
    """What the transport sees: a virtio-blk device (ID, features, config space) whose
    queue pykvm never serves -- :meth:`attach` hands it to the C loop once the driver
    set it up. Until then a kick (the transport's at DRIVER_OK) finds nothing to do."""

    device_id = VIRTIO_ID_BLOCK
    queue_sizes = (256,)
    features = (1 << 2) | (1 << 6)      # SEG_MAX, BLK_SIZE: what pykvm's BlockDevice offers
    name = "c-blk"

    def __init__(self, lib: ctypes.CDLL, image: Path, poll_ns: int = 0):
        super().__init__()
        self.image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)  # no flock: see vhost_device
        self.size = os.fstat(self.image_fd).st_size
        self.server = CQueue(lib.blk_serve, self.image_fd, self.size, poll_ns)
        self.counters = self.server.counters
        self.waiter = EventfdWaiter()

    @property
    def thread(self):
        return self.server.thread

    def config_bytes(self) -> bytes:
        # capacity, size_max, seg_max, geometry, blk_size (virtio 1.2 5.2.4)
        return struct.pack("<QIIHBBI", self.size // SECTOR, 0, 254, 0, 0, 0, SECTOR)

    def process_queue(self, index, queue) -> None:
        pass

    def wants_more(self, index: int) -> bool:
        return False                    # pykvm's worker leaves the ring to the C loop

    @property
    def requests(self) -> dict[str, int]:
        """blk.py's check: what the device served, by kind (BlockDevice's counters)."""
        return {"read": self.counters.reads, "write": self.counters.writes}

    @property
    def failure(self) -> str:
        return self.server.failure

    def attach(self, function, memory, bar_addr: int, notify_offset: int,
               call_fd: int | None) -> None:
        """Take queue 0 over (its doorbell at ``bar_addr + notify_offset``). ``call_fd``:
        the irqfd to signal (MSI-X), or None for the waiter's eventfd."""
        self.server.start(function, memory, 0, bar_addr + notify_offset,
                          self.waiter.fd if call_fd is None else call_fd)

    def close(self) -> None:
        if self.image_fd < 0:
            return                          # closed already
        self.server.stop()
        os.close(self.image_fd)
        self.image_fd = -1
        self.waiter.close()
