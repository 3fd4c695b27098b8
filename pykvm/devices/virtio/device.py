"""What a virtio device is, apart from its transport: an ID, feature bits, a
device-specific config space, queues, and what to do with a queue's buffers.

A device's I/O runs on its own thread (:class:`QueueWorker`), which sleeps in
poll() on one eventfd per queue. The guest's notify write is matched by KVM
against an ioeventfd and signals that eventfd in the kernel, so a request never
passes through a vCPU thread. The host side (console input) kicks a queue by
writing the same eventfd.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Callable

from ... import sandbox
from .queue import Virtqueue

# --- device IDs (virtio 1.x, section 5) --------------------------------------------------
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# --- feature bits every device may offer (section 6) ------------------------------------
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX | VIRTIO_F_VERSION_1

# --- device status (section 2.1) ---------------------------------------------------------
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80


class VirtioDevice:
    """Base of blk, console and rng. Subclasses set the class attributes and
    implement :meth:`process_queue`; the transport owns queues and interrupts."""

    device_id = 0
    name = "virtio"
    queue_sizes: tuple[int, ...] = (256,)
    features = 0   # device-specific feature bits offered (transport bits are added)

    def __init__(self):
        self.driver_features = 0
        self.kick: Callable[[int], None] = lambda index: None   # set by the transport

    @property
    def offered_features(self) -> int:
        return self.features | TRANSPORT_FEATURES

    def config_bytes(self) -> bytes:
        """The device-specific config space, as the driver reads it."""
        return b""

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Most config fields are read-only; writes are ignored unless overridden."""

    def activate(self, features: int) -> None:
        """DRIVER_OK: the driver is ready with these negotiated features."""
        self.driver_features = features

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        """Pop and complete what the driver made available on queue ``index``
        (``queue.add_used``); may raise VirtqueueError for guest garbage."""
        raise NotImplementedError

    def wants_more(self, index: int) -> bool:
        """False when the device left buffers on queue ``index`` on purpose (a receive
        queue with nothing to receive): the transport then waits for a kick."""
        return True

    def give_back_held_chains(self, queues: list[Virtqueue]) -> None:
        """Before a snapshot (transport lock held): chains the device popped but has
        not used -- receive buffers it holds for the next frame -- go back to the avail
        side, so the restored driver is not short of them for good. Most devices hold
        none: they complete what they pop within one pass."""

    def reset(self) -> None:
        """Device reset: forget negotiated state and in-flight host-side data."""
        self.driver_features = 0

    def close(self) -> None:
        """Release host resources (image files, ...)."""


class QueueWorker:
    """One device's I/O thread: poll() on the queues' eventfds, call ``handle(index)``
    for each that fired. ``fds`` are owned by the caller; a private eventfd stops it."""

    def __init__(self, name: str, fds: list[int], handle: Callable[[int], None],
                 on_error: Callable[[BaseException], None]):
        self._fds = fds
        self._handle = handle
        self._on_error = on_error
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def stopping(self) -> bool:
        """Asked to stop: a poll of a queue (poll.py) ends at once."""
        return self._stopping

    def _run(self) -> None:
        sandbox.thread_role("device")   # pykvm/sandbox: seccomp, unless --no-seccomp
        poller = select.poll()
        index_of = {fd: index for index, fd in enumerate(self._fds)}
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while not self._stopping:
            for fd, _ in poller.poll():
                if fd == self._stop_fd or self._stopping:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue   # another reader drained it: nothing new
                try:
                    self._handle(index_of[fd])
                except Exception as error:   # a device bug must not kill the thread silently
                    self._on_error(error)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._stop_fd, 1)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        os.close(self._stop_fd)
        self._stop_fd = -1
