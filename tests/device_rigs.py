"""Virtio device models with every queue activated on DriverRings in a GuestMemory, no
KVM: the rigs that tests/kvm/test_hostile_guest.py attacks and tests/unit/test_virtio_fuzz.py
fuzzes (blk on a file, net on a socket-pair TAP stand-in, console, rng, the serial
ports device)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from pykvm.devices.virtio.blk import BlockDevice
from pykvm.devices.virtio.console import ConsoleDevice
from pykvm.devices.virtio.device import VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.net import NetDevice
from pykvm.devices.virtio.ports import PortsDevice
from pykvm.devices.virtio.queue import Virtqueue
from pykvm.devices.virtio.rng import RngDevice
from pykvm.memory import GuestMemory

RING_BASE = 0x100000          # queue i's rings at RING_BASE + RING_STRIDE * i
RING_STRIDE = 0x10000
MAC = bytes.fromhex("525400000042")
IMAGE_SECTORS = 64

# --- the device models ------------------------------------------------------------------
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
    limit: int = 4096

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.writes += 1
        if len(self.head) < self.limit:
            self.head += data[:self.limit - len(self.head)]

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
             indirect: bool = True, event_idx: bool = False, ring_base: int = RING_BASE,
             ring_stride: int = RING_STRIDE) -> Rig:
    sink = Sink()
    device, image = make_device(kind, tmp_path, sink)
    device.kick = lambda index: None
    rings, queues = [], []
    for index, size in enumerate(device.queue_sizes):
        ring = DriverRing(memory, ring_base + ring_stride * index, size)
        queue = Virtqueue(memory, size)
        queue.desc_addr, queue.avail_addr, queue.used_addr = \
            ring.desc_addr, ring.avail_addr, ring.used_addr
        queue.activate(indirect=indirect, event_idx=event_idx)
        rings.append(ring)
        queues.append(queue)
    device.activate(features | VIRTIO_F_VERSION_1
                    | (VIRTIO_F_RING_INDIRECT_DESC if indirect else 0))
    return Rig(kind, device, memory, rings, queues, sink, image)
