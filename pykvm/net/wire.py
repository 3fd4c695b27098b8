"""The wire: what virtio-net (pykvm/devices/virtio/net.py) needs of a host back end,
and the thread that watches a back end's fd.

A back end -- the TAP's TapWire (in the device module: it maps the device's
feature bits to TUNSETOFFLOAD) or pykvm/net/stream.py's StreamWire (passt) --
implements :class:`Wire`. The interface lives here, below both the device and
the back ends, so that pykvm/net/ never imports the device that uses it: the
device imports the back ends (through pykvm/net/plumbing.py's ``open_nic``),
never the other way round.
"""

from __future__ import annotations

import os
import select
import threading

from .. import sandbox


_SPARE_BYTE = memoryview(bytearray(1))   # recv_frame's: a frame that reaches it did not fit


class WireBusy(Exception):
    """Raised by a wire's ``send`` that took the frame but cannot take the next one
    until its fd is writable again (it has then armed its write watcher)."""


class Wire:
    """What NetDevice needs of a back end. ``send(views)`` puts one frame --
    virtio_net_hdr_v1 then the Ethernet frame, as views of guest RAM -- on the
    wire (OSError if it refused it; WireBusy as above); ``recv_into(views)``
    fills the views (the last one a spare byte) with the next header and frame
    and returns its length (more than the views but the spare byte hold: too
    long, dropped), BlockingIOError when there is none. Both are the plain
    syscalls for a TAP, so its hot loop pays no Python call per frame; so is
    :meth:`send_frame`; ``recv_frame`` is one read()."""

    fd: int = -1
    mtu: int = 1500
    offloads: bool = False          # can it carry partial checksums and TSO frames?
    send = recv_into = None

    def send_frame(self, frame: memoryview) -> None:
        """``send`` of a frame that is one view (header and frame in one buffer, as
        drivers lay out nearly every frame): the device's fast path calls this. A TAP
        makes it one write() (no iovec list to build or walk)."""
        self.send([frame])

    def recv_frame(self, frame: memoryview) -> int | None:
        """``recv_into`` for one view (the device's fast path): the next frame's
        length, ``len(frame)`` or more if it did not fit (it is lost: the fast path
        offers only buffers longer than any frame the MTU allows, so a frame that
        fills one is too long), None when no frame waits. A TAP makes it one read()."""
        try:
            return self.recv_into([frame, _SPARE_BYTE])
        except BlockingIOError:
            return None

    def set_offload(self, features: int) -> None:
        """Tell the host what the driver accepted (``features``) on receive."""

    def flush(self) -> bool:
        """Push out what a WireBusy send left; True once the wire takes frames again."""
        return True

    def start(self, kick_receive, kick_transmit, name: str) -> None:
        """Begin watching: ``kick_receive`` when frames may be readable."""
        self._watcher = FdWatcher(self.fd, kick_receive, f"{name}-rx")
        self._watcher.start()

    def arm(self) -> None:
        """``recv_into`` raised BlockingIOError: wake the receive side when readable."""
        self._watcher.arm()

    def stop(self) -> None:
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.stop()

    def close(self) -> None:
        self.stop()


class FdWatcher:
    """A thread that calls ``on_readable`` once when ``fd`` becomes readable after
    each :meth:`arm` (the consumer arms it when it has drained the fd). With
    ``events=select.POLLOUT`` it watches for writability instead."""

    def __init__(self, fd: int, on_readable, name: str, events: int = select.POLLIN):
        self._fd = fd
        self._events = events
        self._on_readable = on_readable
        self._arm_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.wakeups = 0
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def arm(self) -> None:
        os.eventfd_write(self._arm_fd, 1)

    def _run(self) -> None:
        sandbox.thread_role("device")   # pykvm/sandbox: seccomp, unless --no-seccomp
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self._arm_fd, select.POLLIN)
        armed = False
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_fd in ready:
                return
            if self._arm_fd in ready:
                try:
                    os.eventfd_read(self._arm_fd)
                except BlockingIOError:
                    pass
                if not armed:
                    armed = True
                    poller.register(self._fd, self._events)
            elif armed and self._fd in ready:
                armed = False
                poller.unregister(self._fd)
                self.wakeups += 1
                try:
                    self._on_readable()
                except Exception:   # noqa: BLE001 - the device is closing
                    return

    def stop(self) -> None:
        if self._stop_fd < 0:
            return
        os.eventfd_write(self._stop_fd, 1)
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        os.close(self._stop_fd)
        os.close(self._arm_fd)
        self._stop_fd = self._arm_fd = -1
