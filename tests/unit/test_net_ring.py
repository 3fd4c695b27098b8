"""virtio-net's per-frame fast path (pykvm/devices/virtio/net_ring.py) under a hostile
driver: the receive queue fuzzed against the spec's reference (the chains and rules of
tests/unit/test_virtio_fuzz.py), and a run of good frames cut by a bad entry.

The transmit queue's fuzz is test_virtio_fuzz's "net" case (its one-descriptor chains
take the fast path); receive needs frames, which these tests write to the TAP
stand-in's other end (a datagram socket pair: one datagram, one frame).
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from pykvm.devices.virtio.net import NET_HDR_SIZE, RECEIVE_QUEUE, TRANSMIT_QUEUE
from pykvm.devices.virtio.queue import VirtqueueError
from pykvm.memory import GuestMemory

from ..device_rigs import make_rig
from .test_virtio_fuzz import (CHAINS_PER_EXAMPLE, DATA, EXAMPLES, RAM, Violation,
                               _scatter, _used_area, reference_chain, restart,
                               write_chain)

_DESC = struct.Struct("<QIHH")
WRITE = 2
MEM = 4 << 20            # the rigs' rings are at 1 MiB


def _drain(fd: int) -> None:
    """Frames the device did not take (its chain was refused) leave with the chain."""
    while True:
        try:
            os.read(fd, 1 << 17)
        except BlockingIOError:
            return


def _address_of_byte(buffers: list[tuple[int, int]], offset: int) -> int:
    for addr, length in buffers:
        if offset < length:
            return addr + offset
        offset -= length
    raise AssertionError("no such byte")


def fuzz_receive(rig, size: int, indirect_ok: bool, seed: int) -> int:
    """CHAINS_PER_EXAMPLE receive chains, each offered with one frame waiting that fits
    it: a chain the reference refuses must be a VirtqueueError (never a frame read into
    it); one it accepts gets the frame, num_buffers 1 and one used element."""
    rng = random.Random(seed)
    memory, queue = rig.memory, rig.queues[RECEIVE_QUEUE]
    used_lo, used_hi = _used_area(size)
    avail_idx = restart(memory, queue, size, indirect_ok)
    served = 0
    for _ in range(CHAINS_PER_EXAMPLE):
        avail_idx = write_chain(memory, rng, size, avail_idx, "net")
        before = memory.read(0, RAM)
        used_before = queue.used_idx
        try:
            chain = reference_chain(before, size, queue.last_avail_idx, indirect_ok)
            room = sum(length for _, length in chain.writable)
            bad = bool(chain.readable) or room < NET_HDR_SIZE
        except Violation:
            chain, room, bad = None, 1 << 16, True
        length = rng.randrange(NET_HDR_SIZE, 1 + max(NET_HDR_SIZE, min(room, 1600)))
        frame = rng.randbytes(length)
        rig.device.tap.wire.send(frame)
        if bad:
            with pytest.raises(VirtqueueError):
                rig.process(RECEIVE_QUEUE)
            _drain(rig.device.fd)
            rig.device.reset()
            avail_idx = restart(memory, queue, size, indirect_ok)
            continue
        rig.process(RECEIVE_QUEUE)
        after = memory.read(0, RAM)
        assert (queue.used_idx - used_before) & 0xFFFF == 1
        head, length = struct.unpack_from("<II", after, used_lo + 4 + 8 * (used_before % size))
        assert (head, length) == (chain.head, len(frame))
        # the frame, then num_buffers = 1 over its bytes 10-11 (buffers may overlap:
        # the device writes the count after the frame)
        expected = bytearray(before)
        _scatter(expected, chain.writable, frame)
        for offset, value in ((10, 1), (11, 0)):
            expected[_address_of_byte(chain.writable, offset)] = value
        assert after[:used_lo] == expected[:used_lo]
        assert after[used_hi:] == expected[used_hi:]
        served += 1
    return served


def test_fuzzed_receive_chains_against_the_spec(tmp_path):
    served = 0
    with GuestMemory.anonymous(RAM) as memory:
        rig = make_rig("net", memory, tmp_path, ring_base=0x10000, ring_stride=0x2000)
        try:
            draw = random.Random(13)            # derandomized: the same chains every run
            for _ in range(EXAMPLES):
                served += fuzz_receive(rig, draw.choice((1, 2, 4, 8, 16)), draw.random() < 0.5,
                                       draw.getrandbits(32))
            assert rig.device.stats["rx_frames"] == served
        finally:
            rig.close()
    chains = EXAMPLES * CHAINS_PER_EXAMPLE
    assert chains >= 10_000
    assert served >= chains // 5, served     # enough well-formed chains, enough not


def _publish(ring, memory, heads: list[int]) -> None:
    for head in heads:
        ring.publish(head)


@pytest.mark.parametrize("bad", ["head out of range", "buffer outside RAM", "index too far"])
def test_a_bad_entry_ends_a_transmit_run_after_the_good_frames_are_used(tmp_path, bad):
    with GuestMemory.anonymous(MEM) as memory:
        rig = make_rig("net", memory, tmp_path)
        ring, queue = rig.rings[TRANSMIT_QUEUE], rig.queues[TRANSMIT_QUEUE]
        frames = [bytes(NET_HDR_SIZE) + bytes([i]) * 60 for i in range(3)]
        for i, frame in enumerate(frames):
            memory.write(DATA + 0x1000 * i, frame)
            ring.write_descriptor(i, DATA + 0x1000 * i, len(frame))
        ring.write_descriptor(3, 1 << 30, 100)          # beyond RAM
        _publish(ring, memory, [0, 1, 2])
        if bad == "head out of range":
            ring.publish(queue.size + 5)
        elif bad == "buffer outside RAM":
            ring.publish(3)
        else:
            ring.set_avail_idx(3 + queue.size + 1)
        with pytest.raises(VirtqueueError):
            rig.process(TRANSMIT_QUEUE)
        if bad == "index too far":                  # the index itself: nothing is taken
            assert ring.take_used() == []
            with pytest.raises(BlockingIOError):
                rig.device.tap.wire.recv(4096)
        else:                                       # the good frames, published before
            assert ring.take_used() == [(0, 0), (1, 0), (2, 0)]
            assert [rig.device.tap.wire.recv(4096) for _ in frames] == frames
        rig.close()


@pytest.mark.parametrize("bad", ["head out of range", "buffer outside RAM", "readable buffer"])
def test_a_bad_entry_ends_a_receive_run_after_the_good_frames_are_used(tmp_path, bad):
    with GuestMemory.anonymous(MEM) as memory:
        rig = make_rig("net", memory, tmp_path)
        ring, queue = rig.rings[RECEIVE_QUEUE], rig.queues[RECEIVE_QUEUE]
        for i in range(2):
            ring.write_descriptor(i, DATA + 0x1000 * i, 2048, WRITE)
        ring.write_descriptor(2, 1 << 30, 2048, WRITE) if bad == "buffer outside RAM" \
            else ring.write_descriptor(2, DATA + 0x3000, 2048, 0)
        frames = [bytes(NET_HDR_SIZE) + bytes([i + 1]) * 80 for i in range(3)]
        for frame in frames:
            rig.device.tap.wire.send(frame)
        _publish(ring, memory, [0, 1, queue.size + 1 if bad == "head out of range" else 2])
        with pytest.raises(VirtqueueError):
            rig.process(RECEIVE_QUEUE)
        assert ring.take_used() == [(0, len(frames[0])), (1, len(frames[1]))]
        for i in range(2):
            landed = memory.read(DATA + 0x1000 * i, len(frames[i]))
            assert landed[NET_HDR_SIZE:] == frames[i][NET_HDR_SIZE:]
            assert struct.unpack_from("<H", landed, 10)[0] == 1
        rig.close()


def test_receive_changes_the_guests_descriptor_between_passes_safely(tmp_path):
    """The fast path reads each descriptor once per use: a buffer the driver moves
    out of RAM after one frame is refused on the next, not read from a stale copy."""
    with GuestMemory.anonymous(MEM) as memory:
        rig = make_rig("net", memory, tmp_path)
        ring, queue = rig.rings[RECEIVE_QUEUE], rig.queues[RECEIVE_QUEUE]
        ring.write_descriptor(0, DATA, 2048, WRITE)
        ring.publish(0)
        rig.device.tap.wire.send(bytes(NET_HDR_SIZE) + b"a" * 60)
        rig.process(RECEIVE_QUEUE)
        assert ring.take_used() == [(0, NET_HDR_SIZE + 60)]
        ring.write_descriptor(0, MEM - 100, 2048, WRITE)   # now it runs past RAM
        ring.publish(0)
        rig.device.tap.wire.send(bytes(NET_HDR_SIZE) + b"b" * 60)
        with pytest.raises(VirtqueueError, match="outside guest RAM"):
            rig.process(RECEIVE_QUEUE)
        assert ring.take_used() == []
        rig.close()
