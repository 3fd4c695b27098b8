"""virtio-console (virtio 1.x, section 5.3), one port: the guest's hvc0.

Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) the
guest's output to the host. Without VIRTIO_CONSOLE_F_MULTIPORT, Linux makes
port 0 a console at probe time, so `console=hvc0` on the kernel command line
puts the kernel log and /dev/console there.

The host side is the same as the serial port's: input comes through
:meth:`receive` (the HostConsole's receive callable, on its own thread), output
goes to an object with ``write(bytes)`` (the machine's console router), streamed
in pieces of at most 64 KiB and at most 1 MiB of one request (queue.stream_readable:
a request may name all of guest RAM many times; the host never gathers it).
Input typed before the driver is ready is kept for it, through device resets
(Linux resets the device when it probes it): it is the host's type-ahead, not
device state.
"""

from __future__ import annotations

import struct
import threading

from .device import VIRTIO_ID_CONSOLE, VirtioDevice
from .queue import Virtqueue, scatter, stream_readable

RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 64
MAX_PENDING_INPUT = 1 << 20   # host input the guest has not taken yet; beyond it, dropped

_CONFIG = struct.Struct("<HHII")   # cols, rows, max_nr_ports, emerg_wr


class ConsoleDevice(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, output):
        super().__init__()
        self._output = output
        self._input = bytearray()
        self._input_lock = threading.Lock()
        self.dropped_input = 0
        self.dropped_output = 0   # beyond MAX_STREAM_PER_CHAIN of one request

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(0, 0, 1, 0)

    # --- host side --------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Host input for the guest (any thread)."""
        with self._input_lock:
            room = MAX_PENDING_INPUT - len(self._input)
            self.dropped_input += max(len(data) - room, 0)
            self._input += data[:max(room, 0)]
        self.kick(RECEIVE_QUEUE)

    # --- guest side ---------------------------------------------------------------------------
    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == TRANSMIT_QUEUE:
            self._transmit(queue)
        elif index == RECEIVE_QUEUE:
            self._deliver_input(queue)

    def _transmit(self, queue: Virtqueue) -> None:
        # Streamed in bounded pieces: a request may name all of guest RAM many times.
        self.dropped_output += stream_readable(queue, self._output.write).dropped

    def _deliver_input(self, queue: Virtqueue) -> None:
        while self.wants_more(RECEIVE_QUEUE) and (chain := queue.pop()) is not None:
            with self._input_lock:
                written = scatter(chain.writable, self._input)
                del self._input[:written]
            queue.add_used(chain.head, written)

    def wants_more(self, index: int) -> bool:
        if index != RECEIVE_QUEUE:
            return True
        with self._input_lock:
            return bool(self._input)
