"""The benches' C reference queue servers (bench/c/virtq.h and its devices:
blk_serve.c for bench/blk.py, net_tx_serve.c for bench/net.py): built here with
gcc into one shared object, called through ctypes (which drops the GIL for the
call), each on its own thread.

A :class:`CQueue` takes one queue of a pykvm virtio-pci function over after the
driver's DRIVER_OK: the queue's doorbell ioeventfd moves from pykvm's worker to the
C loop's own eventfd (pykvm's worker then never hears of that queue again), and the
loop serves the ring the driver set up, signalling ``call_fd`` (an MSI-X irqfd, or
a :class:`flatguest.EventfdWaiter`'s eventfd) when the driver asks for an interrupt.
What differs from pykvm's own device is only the Python of the request path and of
its wake-ups; the ioeventfd, the thread wake-ups, the system calls, the irqfd and
the vCPU's exits stay.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
from pathlib import Path

from flatguest import BenchError

from pykvm.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX

C_DIR = Path(__file__).resolve().parent / "c"
SOURCES = ("blk_serve.c", "net_tx_serve.c")
SERVERS = ("blk_serve", "net_tx_serve")


class Queue(ctypes.Structure):
    """struct virtq (c/virtq.h)."""
    _fields_ = [("ram", ctypes.c_void_p), ("ram_size", ctypes.c_uint64),
                ("desc", ctypes.c_uint64), ("avail", ctypes.c_uint64),
                ("used", ctypes.c_uint64), ("backend_size", ctypes.c_uint64),
                ("poll_ns", ctypes.c_int64), ("size", ctypes.c_uint32),
                ("event_idx", ctypes.c_int32), ("kick_fd", ctypes.c_int32),
                ("call_fd", ctypes.c_int32), ("stop_fd", ctypes.c_int32),
                ("backend_fd", ctypes.c_int32)]


class Counters(ctypes.Structure):
    """struct virtq_counters (c/virtq.h): written by the serving thread."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "reads", "writes", "errors", "passes", "wakeups", "signals", "polls_found",
        "polls_missed")] + [("why", ctypes.c_char * 120)]

    def summary(self) -> str:
        return (f"C loop so far: {self.wakeups} wake-ups, {self.passes} passes, "
                f"{self.signals} signals, polls found/missed "
                f"{self.polls_found}/{self.polls_missed}")


def build(workdir: Path) -> ctypes.CDLL:
    """c/*.c -> workdir/virtq_serve.so, loaded; BenchError without gcc."""
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        raise BenchError(f"{compiler} is not installed: no C reference device "
                         f"(apt-get install gcc, or leave the C device out)")
    library = workdir / "virtq_serve.so"
    argv = [compiler, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(library),
            *(str(C_DIR / name) for name in SOURCES)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
    lib = ctypes.CDLL(str(library))
    for name in SERVERS:
        function = getattr(lib, name)
        function.argtypes = (ctypes.POINTER(Queue), ctypes.POINTER(Counters))
        function.restype = ctypes.c_int
    return lib


class CQueue:
    """One queue of a virtio-pci function served by ``server`` (a C function of
    :func:`build`'s library) on a thread of its own, from :meth:`start` to :meth:`stop`."""

    def __init__(self, server, backend_fd: int, backend_size: int = 0, poll_ns: int = 0):
        self._server = server
        self.backend_fd, self.backend_size, self.poll_ns = backend_fd, backend_size, poll_ns
        self.counters = Counters()
        self.thread: threading.Thread | None = None
        self.result: int | None = None
        self._queue: Queue | None = None
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._doorbell: tuple | None = None

    @property
    def failure(self) -> str:
        """Why the C loop stopped serving, '' while it serves."""
        return self.counters.why.decode(errors="replace")

    def start(self, function, memory, index: int, notify_addr: int, call_fd: int) -> None:
        """Take queue ``index`` of ``function`` over (live after DRIVER_OK): its doorbell
        at ``notify_addr`` (a 16-bit write, as pykvm's transport registers it) moves to
        the C loop's eventfd, and the loop starts."""
        from pykvm.devices.virtio.pci import NOTIFY_WIDTH
        queue = function.queues[index]
        if not queue.active:
            raise BenchError(f"queue {index} is not live after DRIVER_OK")
        vm = function.vm
        vm.add_ioeventfd(notify_addr, NOTIFY_WIDTH, function.queue_fds[index], deassign=True)
        vm.add_ioeventfd(notify_addr, NOTIFY_WIDTH, self._kick_fd)
        self._doorbell = (vm, notify_addr, NOTIFY_WIDTH)
        self._queue = Queue(
            ram=memory.host_address(0, memory.size), ram_size=memory.size,
            desc=queue.desc_addr, avail=queue.avail_addr, used=queue.used_addr,
            backend_size=self.backend_size, poll_ns=self.poll_ns, size=queue.size,
            event_idx=int(bool(function.driver_features & VIRTIO_F_RING_EVENT_IDX)),
            kick_fd=self._kick_fd, call_fd=call_fd, stop_fd=self._stop_fd,
            backend_fd=self.backend_fd)
        self.thread = threading.Thread(target=self._serve, name="c-queue", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.result = self._server(ctypes.byref(self._queue), ctypes.byref(self.counters))

    def stop(self) -> None:
        """Stop the loop and give the doorbell back to no one (the VM is closing)."""
        if self._stop_fd < 0:
            return
        if self.thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self.thread.join(timeout=10)
        if self._doorbell is not None:
            vm, addr, width = self._doorbell
            self._doorbell = None
            try:
                vm.add_ioeventfd(addr, width, self._kick_fd, deassign=True)
            except OSError:
                pass                        # the VM is already gone
        os.close(self._stop_fd)
        os.close(self._kick_fd)
        self._stop_fd = self._kick_fd = -1
