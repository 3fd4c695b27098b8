"""A hostile guest against every virtio device pykvm has (blk, net, console, rng,
the serial ports device), issue 12's threat model: the guest is an attacker.

Two levels:

- the device models driven directly through their queues in a GuestMemory (no
  KVM): each malformed chain ends as VirtqueueError (the transport's
  NEEDS_RESET) or as a harmless completion, never as another exception, and a
  request costs the host a fixed amount of memory whatever it names;
- end to end: flat guests (tests/guests/hostile*.S) program the devices through
  their PCI BARs on the real bus under KVM (see the second half of this file).
"""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc
from dataclasses import dataclass, field

import pytest

from pykvm.devices.virtio.blk import BlockDevice
from pykvm.devices.virtio.console import ConsoleDevice
from pykvm.devices.virtio.device import VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.net import NetDevice
from pykvm.devices.virtio.ports import PortsDevice
from pykvm.devices.virtio.queue import MAX_STREAM_PER_CHAIN, STREAM_CHUNK, Virtqueue
from pykvm.devices.virtio.rng import RngDevice
from pykvm.memory import GuestMemory

RING_BASE = 0x100000          # queue i's rings at RING_BASE + RING_STRIDE * i
RING_STRIDE = 0x10000
MAC = bytes.fromhex("525400000042")
IMAGE_SECTORS = 64
HOST_MEMORY_BOUND = 1 << 20   # what one request may make the host allocate, at most


# --- device models without KVM ------------------------------------------------------------------
class FakeTap:
    """A TAP stand-in: a datagram socket pair; the device owns ``fd``, the test ``wire``."""

    def __init__(self):
        self._device_end, self.wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._device_end.setblocking(False)
        self.wire.setblocking(False)
        self.fd = self._device_end.fileno()
        self.offload = 0

    def set_offload(self, flags: int) -> None:
        self.offload = flags

    def close(self) -> None:
        self._device_end.close()
        self.wire.close()


@dataclass
class Sink:
    """A host end that counts what it was given and keeps only the first bytes."""

    size: int = 0
    writes: int = 0
    head: bytearray = field(default_factory=bytearray)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.writes += 1
        if len(self.head) < 4096:
            self.head += data[:4096 - len(self.head)]

    __call__ = write


@dataclass
class Rig:
    """One device with every queue activated on DriverRings in ``memory``."""

    kind: str
    device: object
    memory: GuestMemory
    rings: list[DriverRing]
    queues: list[Virtqueue]
    sink: Sink
    image: str | None = None

    def process(self, index: int) -> None:
        self.device.process_queue(index, self.queues[index])

    def close(self) -> None:
        self.device.close()


DEVICE_KINDS = ("blk", "net", "console", "rng", "ports")
# The queue a driver posts requests on (device-readable data), per kind.
REQUEST_QUEUE = {"blk": 0, "net": 1, "console": 1, "rng": 0, "ports": 1}


def make_device(kind: str, tmp_path, sink: Sink):
    if kind == "blk":
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(range(256)) * (IMAGE_SECTORS * 2))
        return BlockDevice(str(image)), str(image)
    if kind == "net":
        return NetDevice(FakeTap(), MAC), None
    if kind == "console":
        return ConsoleDevice(sink), None
    if kind == "rng":
        return RngDevice(), None
    return PortsDevice([("org.pykvm.test.0", sink)]), None


def make_rig(kind: str, memory: GuestMemory, tmp_path, *, features: int = 0,
             indirect: bool = True, event_idx: bool = False) -> Rig:
    sink = Sink()
    device, image = make_device(kind, tmp_path, sink)
    device.kick = lambda index: None
    rings, queues = [], []
    for index, size in enumerate(device.queue_sizes):
        ring = DriverRing(memory, RING_BASE + RING_STRIDE * index, size)
        queue = Virtqueue(memory, size)
        queue.desc_addr, queue.avail_addr, queue.used_addr = \
            ring.desc_addr, ring.avail_addr, ring.used_addr
        queue.activate(indirect=indirect, event_idx=event_idx)
        rings.append(ring)
        queues.append(queue)
    device.activate(features | VIRTIO_F_VERSION_1
                    | (VIRTIO_F_RING_INDIRECT_DESC if indirect else 0))
    return Rig(kind, device, memory, rings, queues, sink, image)


@pytest.fixture
def ram():
    with GuestMemory.anonymous(16 << 20) as memory:
        yield memory


# --- bounded host memory (issue 12, item 2) ----------------------------------------------------------
@pytest.mark.parametrize("kind", DEVICE_KINDS)
@pytest.mark.parametrize("writable", [False, True], ids=["readable", "writable"])
def test_a_request_naming_all_of_ram_many_times_costs_a_fixed_bound(ram, tmp_path, kind,
                                                                     writable):
    # One chain of 8 descriptors, each covering all 16 MiB of guest RAM: console and
    # serial gathered it into one 128 MiB bytearray (64 x RAM with 64 descriptors).
    rig = make_rig(kind, ram, tmp_path)
    try:
        ram.write(0, struct.pack("<IIQ", 1, 0, 0))     # blk: a write header at address 0
        index = REQUEST_QUEUE[kind] if not writable else 0
        rig.rings[index].add_chain([(0, ram.size, writable)] * 8)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            try:
                rig.process(index)
            except Exception as error:   # noqa: BLE001 - a VirtqueueError is fine here
                assert type(error).__name__ == "VirtqueueError", error
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < HOST_MEMORY_BOUND, f"{kind}: {peak} bytes for one request"
        if kind in ("console", "ports") and not writable:
            assert rig.sink.size == MAX_STREAM_PER_CHAIN        # the rest is dropped
            assert rig.sink.writes == MAX_STREAM_PER_CHAIN // STREAM_CHUNK
    finally:
        rig.close()


def test_streamed_output_keeps_order_across_chains_and_descriptors(ram, tmp_path):
    rig = make_rig("console", ram, tmp_path)
    try:
        pieces = [bytes([65 + i]) * (1000 * (i + 1)) for i in range(5)]
        address = 0x10000
        for piece in pieces:
            ram.write(address, piece)
            half = len(piece) // 2
            rig.rings[1].add_chain([(address, half, False), (address + half, len(piece) - half,
                                                              False)])
            address += 0x2000
        rig.process(1)
        assert rig.sink.size == sum(map(len, pieces))
        assert bytes(rig.sink.head) == b"".join(pieces)[:4096]
        assert rig.rings[1].take_used() == [(2 * i, 0) for i in range(5)]
    finally:
        rig.close()
