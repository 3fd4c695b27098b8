"""virtio-serial: a virtio-console device with named ports and no console
(virtio 1.x, section 5.3, with VIRTIO_CONSOLE_F_MULTIPORT).

Where :mod:`.console` is one anonymous port that Linux turns into hvc0, this
device carries byte streams for programs: Linux makes each port a character
device ``/dev/vport<N>p<id>`` (N: the virtio device's index) and shows its name
in ``/sys/class/virtio-ports/vport<N>p<id>/name``, which is how a guest program
finds its port (QEMU's virtio-serial does the same; udev would add
``/dev/virtio-ports/<name>`` links, a busybox initramfs has no udev). pykvm's
guest agent uses the port ``org.pykvm.agent.0`` (pykvm/agent/).

Queues, as the Linux driver lays them out: 0/1 receive/transmit of port 0,
2/3 the control queues (receive: device -> driver, transmit: driver -> device),
then 4/5 port 1, 6/7 port 2, ...

Control messages (struct virtio_console_control: id u32, event u16, value u16,
then a payload for PORT_NAME) bring the ports up:

    driver: DEVICE_READY 1
    device: PORT_ADD id               (each port)
    driver: PORT_READY id 1           (its char device exists)
    device: PORT_NAME id + name, PORT_OPEN id 1   (the host end is connected)
    driver: PORT_OPEN id 1/0          (a guest program opened / closed it)

The host end of every port is always "connected": a guest read then waits for
data instead of returning end-of-file, and a guest write goes through.

Host side: guest output of port i goes to that port's ``sink(bytes)`` on the
device's I/O thread (keep it short), in pieces of at most 64 KiB and at most 1 MiB
of one request (the rest is counted in ``Port.dropped``: a request may name all of
guest RAM many times, and the host never gathers it); :meth:`send` queues host data for the
guest and blocks while more than ``MAX_PENDING`` bytes wait (never call it from
the sink). Queued data is delivered only while a guest program has the port
open: Linux throws away what arrives on a closed port, and a frame cut in two
that way would put the reader out of step. Data queued before that is kept,
through device resets, as the console keeps type-ahead.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ...errors import PykvmError
from ...snapshot.schema import blob
from ...snapshot.state import ComponentState, SnapshotError
from .device import VIRTIO_ID_CONSOLE, VirtioDevice
from .queue import Virtqueue, gather, scatter, stream_readable

VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1

# Control events (include/uapi/linux/virtio_console.h).
DEVICE_READY = 0
PORT_ADD = 1
PORT_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7
BAD_ID = 0xFFFFFFFF

CONTROL_RECEIVE_QUEUE = 2      # device -> driver control messages
CONTROL_TRANSMIT_QUEUE = 3     # driver -> device control messages
PORT_QUEUE_SIZE = 128
CONTROL_QUEUE_SIZE = 32
MAX_PORTS = 31                 # Linux's VIRTCONS_MAX_PORTS is 0x8000; a few are enough here
MAX_PENDING = 1 << 20          # host -> guest bytes a port holds before send() blocks
MAX_CONTROL_PENDING = 256      # control messages waiting for driver buffers; beyond: dropped

_CONTROL = struct.Struct("<IHH")
_CONFIG = struct.Struct("<HHII")   # cols, rows, max_nr_ports, emerg_wr


class PortClosed(PykvmError):
    """The device was closed while a sender waited."""


def port_queues(port: int) -> tuple[int, int]:
    """(receive, transmit) queue indices of port ``port``."""
    return (0, 1) if port == 0 else (2 + 2 * port, 3 + 2 * port)


@dataclass
class Port:
    name: str
    sink: Callable[[bytes], object]
    pending: bytearray = field(default_factory=bytearray)
    ready: bool = False          # the driver answered PORT_READY
    guest_open: bool = False     # a guest program holds it open
    sent: int = 0                # bytes delivered to the guest
    received: int = 0            # bytes the guest wrote
    dropped: int = 0             # bytes of a request beyond MAX_STREAM_PER_CHAIN


@dataclass(frozen=True)
class PortState:
    name: str
    ready: bool
    guest_open: bool
    pending: blob(MAX_PENDING)              # host -> guest bytes not yet taken


@dataclass(frozen=True)
class PortsState(ComponentState, tag="virtio-serial"):
    """Each port's flags and pending bytes, and the control messages not yet sent."""

    ports: tuple[PortState, ...]
    control: tuple[blob(_CONTROL.size + 256), ...]

    def check(self) -> None:
        if len(self.ports) > MAX_PORTS or len(self.control) > MAX_CONTROL_PENDING:
            raise SnapshotError(f"virtio-serial: {len(self.ports)} ports, "
                                f"{len(self.control)} control messages")


class PortsDevice(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-serial"
    features = VIRTIO_CONSOLE_F_MULTIPORT

    def __init__(self, ports: list[tuple[str, Callable[[bytes], object]]], *,
                 on_open: Callable[[int, bool], object] | None = None):
        """``ports``: (name, sink) of each port, port ids in order. ``on_open(id, open)``
        is called (on the I/O thread) when a guest program opens or closes a port."""
        super().__init__()
        if not 1 <= len(ports) <= MAX_PORTS:
            raise ValueError(f"a virtio-serial device has 1 to {MAX_PORTS} ports")
        self.ports = [Port(name, sink) for name, sink in ports]
        self.on_open = on_open
        sizes = [PORT_QUEUE_SIZE, PORT_QUEUE_SIZE, CONTROL_QUEUE_SIZE, CONTROL_QUEUE_SIZE]
        sizes += [PORT_QUEUE_SIZE] * (2 * (len(ports) - 1))
        self.queue_sizes = tuple(sizes)
        self._lock = threading.Condition()
        self._control: list[bytes] = []      # device -> driver messages not yet delivered
        self.dropped_control = 0
        self._closed = False

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(0, 0, len(self.ports), 0)

    # --- host side ---------------------------------------------------------------------------
    def send(self, port: int, data: bytes, timeout: float | None = None) -> None:
        """Queue ``data`` for the guest on ``port``; blocks while the port holds more than
        MAX_PENDING bytes the guest has not read (TimeoutError after ``timeout``)."""
        target = self.ports[port]
        view = memoryview(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        while view:
            with self._lock:
                while len(target.pending) >= MAX_PENDING and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"{target.name}: the guest reads nothing")
                    self._lock.wait(0.5 if remaining is None else min(remaining, 0.5))
                if self._closed:
                    raise PortClosed(f"{target.name}: the device is closed")
                room = MAX_PENDING - len(target.pending)
                target.pending += view[:room]
                view = view[room:]
            self.kick(port_queues(port)[0])

    def pending(self, port: int) -> int:
        with self._lock:
            return len(self.ports[port].pending)

    # --- guest side ------------------------------------------------------------------------------
    def _port_of(self, index: int) -> tuple[int, bool]:
        """(port, is the receive queue) for a data queue index."""
        port = 0 if index < 2 else (index - 2) // 2
        return port, index % 2 == 0

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == CONTROL_RECEIVE_QUEUE:
            self._deliver_control(queue)
        elif index == CONTROL_TRANSMIT_QUEUE:
            self._take_control(queue)
        else:
            port, receive = self._port_of(index)
            if port >= len(self.ports):
                return
            if receive:
                self._deliver(self.ports[port], queue)
            else:
                self._transmit(self.ports[port], queue)

    def wants_more(self, index: int) -> bool:
        with self._lock:
            if index == CONTROL_RECEIVE_QUEUE:
                return bool(self._control)
            if index == CONTROL_TRANSMIT_QUEUE:
                return True
            port, receive = self._port_of(index)
            return not receive or (port < len(self.ports) and self.ports[port].guest_open
                                   and bool(self.ports[port].pending))

    def _transmit(self, port: Port, queue: Virtqueue) -> None:
        # Streamed in bounded pieces: a request may name all of guest RAM many times.
        count = stream_readable(queue, port.sink)
        port.received += count.sent
        port.dropped += count.dropped

    def _deliver(self, port: Port, queue: Virtqueue) -> None:
        with self._lock:
            while port.guest_open and port.pending and (chain := queue.pop()) is not None:
                written = scatter(chain.writable, port.pending)
                del port.pending[:written]
                port.sent += written
                queue.add_used(chain.head, written)
            self._lock.notify_all()

    def _deliver_control(self, queue: Virtqueue) -> None:
        with self._lock:
            while self._control and (chain := queue.pop()) is not None:
                message = self._control[0]
                if chain.writable_len < len(message):
                    # Linux gives PAGE_SIZE buffers; a shorter one cannot take it whole.
                    queue.add_used(chain.head, 0)
                    continue
                self._control.pop(0)
                queue.add_used(chain.head, scatter(chain.writable, message))

    def _queue_control(self, port_id: int, event: int, value: int, payload: bytes = b"") -> None:
        if len(self._control) >= MAX_CONTROL_PENDING:
            self.dropped_control += 1
            return
        self._control.append(_CONTROL.pack(port_id, event, value) + payload)

    def _take_control(self, queue: Virtqueue) -> None:
        opened: list[tuple[int, bool]] = []
        queued = False
        with self._lock:
            while (chain := queue.pop()) is not None:
                message = gather(chain.readable, _CONTROL.size)
                queue.add_used(chain.head, 0)
                if len(message) < _CONTROL.size:
                    continue          # garbage: ignore it
                port_id, event, value = _CONTROL.unpack(message)
                if event == DEVICE_READY and value == 1:
                    for number in range(len(self.ports)):
                        self._queue_control(number, PORT_ADD, 0)
                    queued = True
                elif port_id >= len(self.ports):
                    continue
                elif event == PORT_READY and value == 1:
                    port = self.ports[port_id]
                    port.ready = True
                    self._queue_control(port_id, PORT_NAME, 1, port.name.encode() + b"\0")
                    self._queue_control(port_id, PORT_OPEN, 1)
                    queued = True
                elif event == PORT_OPEN:
                    self.ports[port_id].guest_open = bool(value)
                    opened.append((port_id, bool(value)))
        if queued:
            self.kick(CONTROL_RECEIVE_QUEUE)
        for port_id, state in opened:
            if state:
                self.kick(port_queues(port_id)[0])      # what waited for the open
        if self.on_open is not None:
            for port_id, state in opened:
                self.on_open(port_id, state)

    # --- life cycle and snapshots ---------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._control.clear()
            for port in self.ports:
                port.ready = port.guest_open = False
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def save_state(self) -> PortsState:
        with self._lock:
            return PortsState(tuple(PortState(p.name, p.ready, p.guest_open, bytes(p.pending))
                                    for p in self.ports), tuple(self._control))

    def restore_state(self, state: PortsState) -> None:
        if [p.name for p in state.ports] != [p.name for p in self.ports]:
            raise SnapshotError(f"{self.name}: saved ports {[p.name[:20] for p in state.ports][:8]} "
                                f"are not this device's {[p.name for p in self.ports]}")
        with self._lock:
            for port, saved in zip(self.ports, state.ports):
                port.ready = saved.ready
                port.guest_open = saved.guest_open
                port.pending = bytearray(saved.pending) + port.pending
            self._control = list(state.control)
