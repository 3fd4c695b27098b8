"""A seeded fuzzer of the virtio request path: at least 10,000 descriptor chains per
device model (blk, net transmit, console, rng, virtio-serial) and for the bare
Virtqueue, each checked against a reference written from the spec's rules, not
from pykvm's code (virtio 1.2 section 2.7: split virtqueues).

The reference (:func:`reference_chain`) reads the rings from a copy of guest RAM
and says what the chain is -- its device-readable and device-writable buffers --
or which rule it breaks:

- 2.7.6: the avail index may be ahead of the device by at most the queue size; a
  head (and every `next`) indexes the descriptor table;
- 2.7.5.2 / 2.7.4.2: a chain is at most queue-size descriptors (so a loop is an
  error), device-writable buffers come after all device-readable ones;
- 2.7.5.3: an indirect descriptor only when VIRTIO_F_INDIRECT_DESC was negotiated,
  never with NEXT, a table of whole descriptors (at most queue size of them) in
  RAM, no indirect descriptor inside a table; its own WRITE flag is ignored;
- every buffer lies in guest RAM.

A chain the reference refuses must end as VirtqueueError (the transport's
NEEDS_RESET) and nothing else; a chain it accepts must be served: exactly one used
element for its head, a length no larger than its device-writable part, guest RAM
changed only in its writable buffers (and the used ring), and the device's effect
(what blk reads and writes, what goes to the TAP or the console) as a small model
of the device says.

Hypothesis draws the queue size, the features and a seed per example; each
example then makes CHAINS_PER_EXAMPLE chains from the seed (derandomized: the
same chains every run).
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.devices.virtio.blk import SECTOR_SIZE
from pykvm.devices.virtio.net import MAX_GSO_FRAME
from pykvm.devices.virtio.queue import MAX_STREAM_PER_CHAIN, Virtqueue, VirtqueueError
from pykvm.devices.virtio.rng import MAX_BYTES_PER_REQUEST
from pykvm.memory import GuestMemory

from ..device_rigs import IMAGE_SECTORS, make_rig
from .test_virtqueue import address_of

RAM = 128 << 10
RING = 0x1000          # descriptor table, avail and used ring of the fuzzed queue
TABLES = 0x4000        # indirect tables
DATA = 0x8000          # buffers
EXAMPLES = 100
CHAINS_PER_EXAMPLE = 100
NEXT, WRITE, INDIRECT = 1, 2, 4
_DESC = struct.Struct("<QIHH")


# --- the reference: virtio 1.2 section 2.7 ---------------------------------------------------------
class Violation(Exception):
    """The chain breaks one of the spec's rules."""


@dataclass
class Chain:
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


def _in_ram(addr: int, length: int) -> bool:
    return 0 <= addr and addr + length <= RAM


def reference_chain(ram: bytes, size: int, last_avail: int, indirect_ok: bool) -> Chain | None:
    """The next chain the driver made available in ``ram``, None if there is none;
    Violation if the rings break a rule."""
    desc, avail = RING, RING + 16 * size
    avail_idx = struct.unpack_from("<H", ram, avail + 2)[0]
    pending = (avail_idx - last_avail) & 0xFFFF
    if pending == 0:
        return None
    if pending > size:
        raise Violation("avail index ahead by more than the queue size")
    head = struct.unpack_from("<H", ram, avail + 4 + 2 * (last_avail % size))[0]
    chain = Chain(head)
    table, entries, index, seen, nested = desc, size, head, 0, False
    while True:
        if index >= entries:
            raise Violation("descriptor index outside its table")
        seen += 1
        if seen > entries:
            raise Violation("chain longer than its table (a loop)")
        addr, length, flags, next_index = _DESC.unpack_from(ram, table + 16 * index)
        if flags & INDIRECT:
            if nested or not indirect_ok or flags & NEXT:
                raise Violation("indirect descriptor where none may be")
            if length == 0 or length % 16 or length // 16 > size or not _in_ram(addr, length):
                raise Violation("bad indirect table")
            table, entries, index, seen, nested = addr, length // 16, 0, 0, True
            continue
        if not _in_ram(addr, length):
            raise Violation("buffer outside RAM")
        if flags & WRITE:
            chain.writable.append((addr, length))
        elif chain.writable:
            raise Violation("device-readable after device-writable")
        else:
            chain.readable.append((addr, length))
        if not flags & NEXT:
            return chain
        index = next_index


# --- making chains -------------------------------------------------------------------------------
LENGTHS = (0, 1, 12, 16, 64, 100, 512, 1024, 1500, 4096)
HOSTILE_BUFFERS = ((RAM - 8, 64), (RAM, 0), (RAM, 1), (1 << 32, 16), (0, 0xFFFFFFFF),
                   ((1 << 64) - 16, 32), (0xC0000000, 4096))


def _buffer(rng: random.Random) -> tuple[int, int]:
    if rng.random() < 0.04:
        return rng.choice(HOSTILE_BUFFERS)
    length = rng.choice(LENGTHS)
    return DATA + rng.randrange(RAM - DATA - length + 1), length


def _blk_header(rng: random.Random) -> bytes:
    kind = rng.choice((0, 0, 1, 1, 4, 8, 99))
    sector = rng.choice((0, 1, IMAGE_SECTORS - 1, IMAGE_SECTORS, rng.randrange(IMAGE_SECTORS),
                         (1 << 64) - 1))
    return struct.pack("<IIQ", kind, 0, sector)


def write_chain(memory: GuestMemory, rng: random.Random, size: int, avail_idx: int,
                kind: str) -> int:
    """Write one (mostly well-formed, sometimes hostile) chain and publish it; returns
    the new avail index."""
    count = rng.choice((1, 1, 2, 3, 3, 4, size, size + 1)) if rng.random() < 0.95 else size + 3
    readable = rng.randrange(count + 1)
    buffers = []
    for position in range(count):
        addr, length = _buffer(rng)
        flags = 0 if position < readable else WRITE
        buffers.append([addr, length, flags])
    if kind == "blk" and rng.random() < 0.8:
        # header, data in whole sectors, status: a request the device can serve
        addr = DATA + 16 * rng.randrange((RAM - DATA) // 16 - 1)
        memory.write(addr, _blk_header(rng))
        buffers = [[addr, 16, 0]] + [[DATA + rng.randrange(RAM - DATA - 1024),
                                      SECTOR_SIZE * rng.choice((0, 1, 2)), rng.choice((0, WRITE))]
                                     for _ in range(rng.choice((0, 1, 2)))]
        buffers.sort(key=lambda b: b[2])
        buffers.append([DATA + rng.randrange(RAM - DATA), 1, WRITE])
        count = len(buffers)
    mutation = rng.random()
    if mutation < 0.03 and count > 1:                 # wrong direction
        buffers[rng.randrange(count)][2] ^= WRITE
    elif mutation < 0.05:                             # flags nobody defined
        buffers[rng.randrange(count)][2] |= rng.choice((8, 0x80, 0x8000))

    indirect = rng.random() < 0.3
    if indirect:
        table = TABLES + 16 * rng.randrange(64)
        for i, (addr, length, flags) in enumerate(buffers):
            last = i == count - 1
            memory.write(table + 16 * i, _DESC.pack(addr, length, flags | (0 if last else NEXT),
                                                    0 if last else i + 1))
        length, flags = 16 * count, INDIRECT | rng.choice((0, WRITE))
        head = rng.randrange(size)
        twist = rng.random()
        if twist < 0.03:
            length = rng.choice((0, 24, 16 * (size + 1)))
        elif twist < 0.05:
            flags |= NEXT
        elif twist < 0.07:
            table = RAM - 16
        elif twist < 0.09:                           # an indirect descriptor inside the table
            memory.write(table, _DESC.pack(TABLES, 32, INDIRECT, 0))
        elif twist < 0.11 and count > 1:            # a loop inside the table
            memory.write(table + 16 * (count - 1), _DESC.pack(DATA, 16, NEXT, 0))
        memory.write(RING + 16 * head, _DESC.pack(table, length, flags, 0))
    else:
        order = list(range(size))
        rng.shuffle(order)
        indices = [order[i % size] for i in range(count)]   # reuse past the table: a loop
        for i, (addr, length, flags) in enumerate(buffers):
            last = i == count - 1
            memory.write(RING + 16 * indices[i], _DESC.pack(
                addr, length, flags | (0 if last else NEXT), 0 if last else indices[i + 1]))
        head = indices[0]
        twist = rng.random()
        if twist < 0.03:
            head = size + rng.randrange(4)
        elif twist < 0.05:                           # next outside the table
            memory.write(RING + 16 * indices[-1], _DESC.pack(DATA, 16, NEXT, size + 1))
    avail = RING + 16 * size
    memory.write_u16(avail + 4 + 2 * (avail_idx % size), head)
    step = 1 if rng.random() > 0.01 else size + 1 + rng.randrange(100)   # an index jump
    avail_idx = (avail_idx + step) & 0xFFFF
    memory.write_u16(avail + 2, avail_idx)
    return avail_idx


# --- models of the devices ------------------------------------------------------------------------
def _bytes(ram: bytes, buffers: list[tuple[int, int]]) -> bytes:
    return b"".join(ram[addr:addr + length] for addr, length in buffers)


def _scatter(ram: bytearray, buffers: list[tuple[int, int]], data: bytes) -> int:
    done = 0
    for addr, length in buffers:
        if done >= len(data):
            break
        count = min(length, len(data) - done)
        ram[addr:addr + count] = data[done:done + count]
        done += count
    return done


def _split_last_byte(buffers):
    """(the buffers' first total-1 bytes, the address of the last byte): blk's data and
    status (virtio 1.2 section 5.2.6: the status is the last device-writable byte)."""
    total = sum(length for _, length in buffers)
    out, position = [], 0
    for addr, length in buffers:
        take = min(length, total - 1 - position)
        if take > 0:
            out.append((addr, take))
        position += length
    addr, length = next((a, l) for a, l in reversed(buffers) if l)
    return out, addr + length - 1


@dataclass
class Model:
    """What the device must do with an accepted chain: RAM as it must be after (None:
    not predictable, e.g. random bytes), the used length, and any side effect."""

    ram: bytearray | None
    used_len: int | None
    error: bool = False
    output: bytes | None = None


def model_blk(rig, chain: Chain, ram: bytes) -> Model:
    readable, writable = chain.readable, chain.writable
    total_w = sum(length for _, length in writable)
    if total_w < 1 or sum(length for _, length in readable) < 16:
        return Model(None, None, error=True)
    kind, _, sector = struct.unpack_from("<IIQ", _bytes(ram, readable)[:16])
    data_in, status_at = _split_last_byte(writable)
    after = bytearray(ram)
    written, status = 0, 0
    image = rig.image_model
    if kind in (0, 1):
        data = data_in if kind == 0 else None
        length = sum(l for _, l in data_in) if kind == 0 else \
            sum(l for _, l in readable) - 16
        offset = sector * SECTOR_SIZE
        if length % SECTOR_SIZE or offset + length > len(image):
            status = 1
        elif kind == 0:
            _scatter(after, data, bytes(image[offset:offset + length]))
            written = total_w - 1
        else:
            image[offset:offset + length] = _bytes(ram, readable)[16:]
    elif kind == 4:
        pass
    elif kind == 8:
        written = _scatter(after, data_in, b"".ljust(20, b"\0"))
    else:
        status = 2
    after[status_at] = status
    return Model(after, written + 1)


def model_rng(rig, chain: Chain, ram: bytes) -> Model:
    total_w = sum(length for _, length in chain.writable)
    return Model(None, min(total_w, MAX_BYTES_PER_REQUEST))


def model_output(rig, chain: Chain, ram: bytes) -> Model:
    return Model(bytearray(ram), 0, output=_bytes(ram, chain.readable)[:MAX_STREAM_PER_CHAIN])


def model_net_tx(rig, chain: Chain, ram: bytes) -> Model:
    frame = _bytes(ram, chain.readable)
    sent = frame if 12 <= len(frame) <= MAX_GSO_FRAME else b""
    return Model(bytearray(ram), 0, output=sent)


MODELS = {"blk": model_blk, "rng": model_rng, "console": model_output, "ports": model_output,
          "net": model_net_tx}


# --- the fuzzer ------------------------------------------------------------------------------------
def _used_area(size: int) -> tuple[int, int]:
    used = (RING + 16 * size + 6 + 2 * size + 3) & ~3
    return used, used + 6 + 8 * size


def _taken_output(rig) -> bytes:
    if rig.kind == "net":
        out = b""
        while True:
            try:
                out += rig.device.tap.wire.recv(1 << 17)
            except BlockingIOError:
                return out
    data = bytes(rig.sink.head)
    rig.sink.head.clear()
    return data


def restart(memory: GuestMemory, queue: Virtqueue, size: int, indirect_ok: bool) -> int:
    """The queue as a driver sets it up anew (after a reset): zeroed rings of ``size``
    at RING, activated; returns the avail index to start from."""
    memory.fill(RING, DATA - RING, 0)
    queue.reset()
    queue.size = size
    queue.desc_addr, queue.avail_addr = RING, RING + 16 * size
    queue.used_addr = _used_area(size)[0]
    queue.activate(indirect=indirect_ok, event_idx=False)
    return 0


def fuzz(rig, queue_index: int, size: int, indirect_ok: bool, seed: int) -> int:
    """CHAINS_PER_EXAMPLE chains through ``rig``'s queue; returns how many were served."""
    rng = random.Random(seed)
    memory = rig.memory
    queue = rig.queues[queue_index]
    served = 0

    def start():
        return restart(memory, queue, size, indirect_ok)

    avail_idx = start()
    used_lo, used_hi = _used_area(size)
    for _ in range(CHAINS_PER_EXAMPLE):
        avail_idx = write_chain(memory, rng, size, avail_idx, rig.kind)
        before = memory.read(0, RAM)
        used_before = queue.used_idx
        try:
            chain = reference_chain(before, size, queue.last_avail_idx, indirect_ok)
        except Violation:
            with pytest.raises(VirtqueueError):
                rig.device.process_queue(queue_index, queue)
            avail_idx = start()
            continue
        assert chain is not None                    # every chain is published
        model = MODELS[rig.kind](rig, chain, before)
        if model.error:
            with pytest.raises(VirtqueueError):
                rig.device.process_queue(queue_index, queue)
            avail_idx = start()
            continue
        rig.device.process_queue(queue_index, queue)
        after = memory.read(0, RAM)
        assert (queue.used_idx - used_before) & 0xFFFF == 1
        head, length = struct.unpack_from("<II", after, used_lo + 4 + 8 * (used_before % size))
        assert head == chain.head
        assert length <= sum(l for _, l in chain.writable)
        if model.used_len is not None:
            assert length == model.used_len
        if model.ram is not None:                    # RAM as the model says, bar the used ring
            assert after[:used_lo] == model.ram[:used_lo]
            assert after[used_hi:] == model.ram[used_hi:]
        else:                                        # changed only where the device may write
            outside = bytearray(after)
            for addr, length in [(used_lo, used_hi - used_lo)] + chain.writable:
                outside[addr:addr + length] = before[addr:addr + length]
            assert outside == before
        if model.output is not None:
            assert _taken_output(rig) == model.output
        if rig.kind == "blk":
            assert os.pread(rig.device.fd, len(rig.image_model), 0) == bytes(rig.image_model)
        served += 1
    return served


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                         suppress_health_check=list(HealthCheck), database=None)
KINDS = ("blk", "net", "console", "rng", "ports")
REQUEST_QUEUE = {"blk": 0, "net": 1, "console": 1, "rng": 0, "ports": 1}


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_chains_against_the_spec(kind, tmp_path):
    totals = {"chains": 0, "served": 0}
    with GuestMemory.anonymous(RAM) as memory:
        # The other queues' rings lie among the buffers: only the fuzzed one is served.
        rig = make_rig(kind, memory, tmp_path, ring_base=0x10000, ring_stride=0x2000)
        rig.sink.limit = 1 << 30                    # keep all output: it is checked
        if kind == "blk":
            with open(rig.image, "rb") as image:
                rig.image_model = bytearray(image.read())
        try:
            @FUZZ_SETTINGS
            @given(size=st.sampled_from((1, 2, 4, 8, 16)), indirect=st.booleans(),
                   seed=st.integers(0, 2 ** 32 - 1))
            def run(size, indirect, seed):
                totals["served"] += fuzz(rig, REQUEST_QUEUE[kind], size, indirect, seed)
                totals["chains"] += CHAINS_PER_EXAMPLE

            run()
        finally:
            rig.close()
    assert totals["chains"] >= 10_000
    # Enough of them were well-formed to exercise the device, enough were not.
    assert totals["served"] >= totals["chains"] // 5, totals


def _located(memory, views):
    """(guest address, length) of each view; an empty view has no address to find."""
    return [(address_of(memory, v) if len(v) else None, len(v)) for v in views]


def _unlocated_empty(buffers):
    return [(addr if length else None, length) for addr, length in buffers]


def pop_one(memory: GuestMemory, queue: Virtqueue, size: int, seed: int, indirect_ok: bool,
            counts: dict) -> None:
    rng = random.Random(seed)
    avail_idx = 0

    def start():
        return restart(memory, queue, size, indirect_ok)

    avail_idx = start()
    for _ in range(CHAINS_PER_EXAMPLE):
        avail_idx = write_chain(memory, rng, size, avail_idx, "queue")
        ram = memory.read(0, RAM)
        try:
            expected = reference_chain(ram, size, queue.last_avail_idx, indirect_ok)
        except Violation:
            with pytest.raises(VirtqueueError):
                queue.pop()
            counts["refused"] += 1
            avail_idx = start()
            continue
        chain = queue.pop()
        assert chain.head == expected.head
        assert _located(memory, chain.readable) == _unlocated_empty(expected.readable)
        assert _located(memory, chain.writable) == _unlocated_empty(expected.writable)
        queue.add_used(chain.head, 0)
        counts["accepted"] += 1


def test_fuzzed_rings_pop_exactly_what_the_spec_says():
    counts = {"accepted": 0, "refused": 0}
    with GuestMemory.anonymous(RAM) as memory:
        queue = Virtqueue(memory, 16)

        @FUZZ_SETTINGS
        @given(size=st.sampled_from((1, 2, 4, 8, 16)), indirect=st.booleans(),
               seed=st.integers(0, 2 ** 32 - 1))
        def run(size, indirect, seed):
            pop_one(memory, queue, size, seed, indirect, counts)

        run()
    assert sum(counts.values()) >= 10_000
    assert min(counts.values()) >= 2_000, counts
