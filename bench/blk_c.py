"""bench/blk.py's C reference device (``--backend c``): the floor of pykvm's
virtio-blk request path on this host, with no Python in it.

The VM, the guest (bench/guests/blk_loop.S), the virtio-pci function and the
driver's probe are blk.py's, exactly as for pykvm's own device; only the queue is
served by another thread: bench/c/blk_serve.c, built here with gcc into a shared
object and called through ctypes (which drops the GIL for the call). It sleeps in
poll() on the doorbell's ioeventfd -- the same KVM ioeventfd path as pykvm's worker,
which is taken off the doorbell -- serves the split ring with preadv/pwritev
straight between the image and guest RAM, honours EVENT_IDX, and signals one
eventfd per pass when the driver asked for an interrupt: the MSI-X vector's irqfd
(``--spin --msix``), or else the eventfd the bench's wait register blocks on
(:class:`flatguest.EventfdWaiter`, the same one exit per wait as pykvm's INTx
path, without the Python INTx/ISR steps in between).

What differs from pykvm's device, then, is the Python of the request path and of
its wake-ups (the worker's poll loop, ``serve_queue``, ``pop``/``handle``/
``add_used``, the INTx line's ``Event.set``); what stays is the host's part: the
ioeventfd, the thread wake-ups, preadv, the irqfd, the vCPU's exits.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

from flatguest import BenchError, EventfdWaiter

from pykvm.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_ID_BLOCK, VirtioDevice

C_SOURCE = Path(__file__).resolve().parent / "c" / "blk_serve.c"
SECTOR = 512


class Queue(ctypes.Structure):
    """struct blk_queue (blk_serve.c)."""
    _fields_ = [("ram", ctypes.c_void_p), ("ram_size", ctypes.c_uint64),
                ("desc", ctypes.c_uint64), ("avail", ctypes.c_uint64),
                ("used", ctypes.c_uint64), ("image_size", ctypes.c_uint64),
                ("poll_ns", ctypes.c_int64), ("size", ctypes.c_uint32),
                ("event_idx", ctypes.c_int32), ("kick_fd", ctypes.c_int32),
                ("call_fd", ctypes.c_int32), ("stop_fd", ctypes.c_int32),
                ("image_fd", ctypes.c_int32)]


class Counters(ctypes.Structure):
    """struct blk_counters (blk_serve.c): written by the serving thread."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "reads", "writes", "errors", "passes", "wakeups", "signals", "polls_found",
        "polls_missed")] + [("why", ctypes.c_char * 120)]


def build(workdir: Path) -> ctypes.CDLL:
    """blk_serve.c -> workdir/blk_serve.so, loaded; BenchError without gcc."""
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        raise BenchError(f"{compiler} is not installed: no C reference device "
                         f"(apt-get install gcc, or leave out --backend c)")
    library = workdir / "blk_serve.so"
    argv = [compiler, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(library), str(C_SOURCE)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
    lib = ctypes.CDLL(str(library))
    lib.blk_serve.argtypes = (ctypes.POINTER(Queue), ctypes.POINTER(Counters))
    lib.blk_serve.restype = ctypes.c_int
    return lib


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
        self._lib = lib
        self.image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)  # no flock: see vhost_device
        self.size = os.fstat(self.image_fd).st_size
        self.poll_ns = poll_ns
        self.counters = Counters()
        self.waiter = EventfdWaiter()
        self.thread: threading.Thread | None = None
        self._queue: Queue | None = None
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._doorbell: tuple | None = None
        self.result: int | None = None

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
        """Why the C loop stopped serving, '' while it serves."""
        return self.counters.why.decode(errors="replace")

    def attach(self, function, memory, bar_addr: int, notify_offset: int,
               call_fd: int | None) -> None:
        """Take queue 0 over: the doorbell's ioeventfd moves from pykvm's worker to the
        C loop's eventfd, and the loop starts on its own thread. ``call_fd``: the irqfd
        to signal (MSI-X), or None for the waiter's eventfd."""
        queue = function.queues[0]
        if not queue.active:
            raise BenchError("c-blk: the queue is not live after DRIVER_OK")
        function.bar_unmapped(0, bar_addr)          # pykvm's worker: no more doorbells
        self._doorbell = (function.vm, bar_addr + notify_offset)
        function.vm.add_ioeventfd(bar_addr + notify_offset, 2, self._kick_fd)
        self._queue = Queue(
            ram=memory.host_address(0, memory.size), ram_size=memory.size,
            desc=queue.desc_addr, avail=queue.avail_addr, used=queue.used_addr,
            image_size=self.size, poll_ns=self.poll_ns, size=queue.size,
            event_idx=int(bool(function.driver_features & VIRTIO_F_RING_EVENT_IDX)),
            kick_fd=self._kick_fd, call_fd=self.waiter.fd if call_fd is None else call_fd,
            stop_fd=self._stop_fd, image_fd=self.image_fd)
        self.thread = threading.Thread(target=self._serve, name="c-blk-io", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.result = self._lib.blk_serve(ctypes.byref(self._queue),
                                          ctypes.byref(self.counters))

    def close(self) -> None:
        if self.image_fd < 0:
            return                          # closed already
        if self.thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self.thread.join(timeout=10)
            self.thread = None
        if self._doorbell is not None:
            vm, addr = self._doorbell
            self._doorbell = None
            try:
                vm.add_ioeventfd(addr, 2, self._kick_fd, deassign=True)
            except OSError:
                pass                        # the VM is already gone
        for fd in (self._stop_fd, self._kick_fd, self.image_fd):
            os.close(fd)
        self.waiter.close()
        self._stop_fd = self._kick_fd = self.image_fd = -1
