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

import functools
import io
import os
import queue
import socket
import struct
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

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

from .asm import assemble
from .conftest import needs_kvm

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


# --- the flat guest (tests/guests/hostile.S) --------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
GUEST_MEM = 64 << 20
LOAD_ADDR = 0x10000
PARAMS = LOAD_ADDR + 8                 # hostile.S's parameter block
SCRIPT_ADDR = 0x80000                  # scripts are written here (up to 0x80000 bytes)
CMD_ADDR = 0xD0001000                  # the command register, outside the BAR window's use
OP_END, OP_STORE, OP_LOAD, OP_WATCH = 0, 1, 2, 3
_ENTRY = struct.Struct("<QQQQQ")


class CommandRegister:
    """The guest's read blocks until the test posts a script (1), or returns 0 after a
    while so that the vCPU can be stopped between scripts."""

    name = "hostile-cmd"

    def __init__(self):
        self.pending: queue.Queue[int] = queue.Queue()

    def read(self, offset: int, size: int) -> int:
        try:
            return self.pending.get(timeout=0.05)
        except queue.Empty:
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@dataclass
class Script:
    """What the guest will do, entry by entry (hostile.S's ops)."""

    entries: list[tuple[int, int, int, int]] = field(default_factory=list)

    def store(self, addr: int, value: int, width: int = 4) -> None:
        self.entries.append((OP_STORE, width, addr, value & ((1 << 8 * width) - 1)))

    def load(self, addr: int, width: int = 4) -> int:
        self.entries.append((OP_LOAD, width, addr, 0))
        return len(self.entries) - 1

    def watch(self, used_addr: int, size: int, count: int) -> int:
        self.entries.append((OP_WATCH, size, used_addr, count))
        return len(self.entries) - 1

    def encode(self) -> bytes:
        return b"".join(_ENTRY.pack(*entry, 0) for entry in self.entries + [(OP_END, 0, 0, 0)])


@functools.lru_cache(maxsize=1)
def guest_image() -> bytes:
    source = (ROOT / "tests/guests/hostile.S").read_text()
    tables = (ROOT / "bench/guests/user_tables.inc").read_text()
    return assemble(source + "\n" + tables, "long", LOAD_ADDR)


class FlatGuest:
    """A VM running hostile.S in ring 3 on one vCPU; :meth:`run` has it run a script."""

    def __init__(self, kvm, memory: GuestMemory, log=None):
        from pykvm.boot.modes import set_mode
        from pykvm.vm import Vm

        self.memory = memory
        self.log = log if log is not None else io.StringIO()
        self.vm = Vm(kvm, memory, log=self.log)
        self.commands = CommandRegister()
        self.vm.add_mmio_device(CMD_ADDR, 0x1000, self.commands)
        memory.write(LOAD_ADDR, guest_image())
        memory.write_u64(PARAMS, SCRIPT_ADDR)
        memory.write_u64(PARAMS + 8, CMD_ADDR)
        self.vm.create_vcpus(1)
        set_mode(self.vm.vcpus[0], memory, "long", LOAD_ADDR)

    def start(self) -> None:
        self.vm.start()

    @property
    def progress(self) -> int:
        return self.memory.read_u64(PARAMS + 16)

    def run(self, script: Script, timeout: float = 30.0) -> list[int]:
        """Run ``script`` in the guest; the results of its entries (loads, watches)."""
        encoded = script.encode()
        assert len(encoded) <= 0x80000
        self.memory.write(SCRIPT_ADDR, encoded)
        runs = self.memory.read_u64(PARAMS + 24)
        self.commands.pending.put(1)
        deadline = time.monotonic() + timeout
        while self.memory.read_u64(PARAMS + 24) == runs:
            assert self.vm.stop_reason is None, f"the guest stopped: {self.vm.stop_reason}"
            assert time.monotonic() < deadline, "the guest did not finish its script"
            time.sleep(0.0005)
        return [_ENTRY.unpack_from(self.memory.read(SCRIPT_ADDR + 40 * i, 40))[4]
                for i in range(len(script.entries))]

    def close(self) -> None:
        self.vm.close()


# --- used-ring publication (issue 12, item 3) -------------------------------------------------------
WATCH_RING = 0x200000
WATCH_SIZE = 64


def publish_with_virtqueue(queue: Virtqueue, memory: GuestMemory, k: int) -> None:
    queue.add_used(k, k ^ 0xA5A5A5A5)


def publish_torn(queue: Virtqueue, memory: GuestMemory, k: int) -> None:
    """What a byte-at-a-time index store looks like, slowed down at each carry: the
    check below must see it (or it could not fail)."""
    slot = queue.used_idx % queue.size
    memory.write(queue.used_addr + 4 + 8 * slot, struct.pack("<II", k, k ^ 0xA5A5A5A5))
    queue.used_idx = new = (queue.used_idx + 1) & 0xFFFF
    index = memory.view(queue.used_addr + 2, 2)
    index[0] = new & 0xFF
    if new & 0xFF == 0:
        time.sleep(0.0002)
    index[1] = new >> 8


@needs_kvm
@pytest.mark.parametrize("publish, torn", [(publish_with_virtqueue, False), (publish_torn, True)],
                         ids=["virtqueue", "byte-at-a-time"])
def test_guest_never_sees_a_used_index_or_element_half_published(kvm, publish, torn):
    # A ring-3 guest on its own vCPU reads the used index with one 16-bit load as
    # fast as it can while the host publishes 60,000 completions through 256-carries:
    # every index it sees must be the old one or a newer one (never backwards, never
    # further than the ring holds), and every element it then reads must be the
    # one published (element before index).
    count = 60_000
    with GuestMemory.anonymous(GUEST_MEM) as memory:
        guest = FlatGuest(kvm, memory)
        try:
            ring = DriverRing(memory, WATCH_RING, WATCH_SIZE)
            used = Virtqueue(memory, WATCH_SIZE)
            used.desc_addr, used.avail_addr, used.used_addr = \
                ring.desc_addr, ring.avail_addr, ring.used_addr
            used.activate(indirect=False, event_idx=False)
            script = Script()
            entry = script.watch(ring.used_addr, WATCH_SIZE, count)
            guest.start()
            results: list[int] = []
            runner = threading.Thread(target=lambda: results.extend(guest.run(script, 60)))
            runner.start()
            seen = 0
            for k in range(count):
                while k - seen >= WATCH_SIZE:           # the guest has not taken them yet
                    seen = guest.progress
                publish(used, memory, k)
            runner.join(90)
            assert results, "the guest did not finish watching"
            anomalies = results[entry]
            assert guest.progress == count
        finally:
            guest.close()
    if torn:
        assert anomalies > 0, "the check cannot see a torn index"
    else:
        assert anomalies == 0
