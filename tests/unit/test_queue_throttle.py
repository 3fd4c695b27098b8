"""Rate limiters on pykvm's own virtio-blk and virtio-net (devices/virtio/throttle.py):
a limited disk serves what its buckets allow, leaves the rest in the ring and wakes
itself; PATCH semantics of an update; a NIC's transmit and receive sides."""

import socket
import struct
import time

import pytest

from pykvm.devices.rate_limiter import RateLimiter, TokenBucket
from pykvm.devices.virtio.blk import BlockDevice
from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.net import NET_HDR_SIZE, NetDevice
from pykvm.devices.virtio.queue import Virtqueue
from pykvm.devices.virtio.throttle import KEEP, QueueThrottle, bucket
from pykvm.memory import GuestMemory
from pykvm.net.stream import StreamWire

from .test_rate_limiter import Clock
from .test_virtio_blk import HEADER, STATUS, offer_request

READ = 0


def ring_and_queue(memory, base, size=16):
    ring = DriverRing(memory, base, size)
    queue = Virtqueue(memory, size)
    queue.desc_addr, queue.avail_addr, queue.used_addr = \
        ring.desc_addr, ring.avail_addr, ring.used_addr
    queue.activate(indirect=False, event_idx=False)
    return ring, queue


def limited_disk_parts(memory, tmp_path):
    """A BlockDevice on a zeroed 16-sector image, the indexes of its kicks recorded in
    the list returned with it, and a 16-entry queue 0 at 0x1000: (device, kicks, ring,
    queue). The caller closes the device."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(512 * 16))
    device = BlockDevice(str(image))
    kicks = []
    device.kick = kicks.append
    ring, queue = ring_and_queue(memory, 0x1000)
    return device, kicks, ring, queue


@pytest.fixture
def memory():
    with GuestMemory.anonymous(2 << 20) as ram:
        yield ram


def test_bucket_of_firecracker_fields_and_zero_is_off():
    assert bucket(0, 100) is None and bucket(100, 0) is None
    made = bucket(4096, 100, 7)
    assert (made.size, made.refill_time_ms, made.one_time_burst) == (4096, 100, 7)


def test_update_keeps_what_it_is_not_given_and_removes_with_none():
    kicks = []
    throttle = QueueThrottle(lambda: kicks.append(1), "t")
    try:
        clock = Clock()
        ops = TokenBucket(2, 1000, clock=clock)
        throttle.set(RateLimiter(bandwidth=None, ops=ops))
        throttle.charge(0, 2)
        assert not throttle.admit() and throttle.waits == 1
        throttle.update(bandwidth=TokenBucket(1 << 20, 1000, clock=clock))   # ops KEEP
        assert throttle.limiter.ops is ops and not throttle.admit()
        throttle.update(ops=None)                  # removed: the queue goes on at once
        assert throttle.admit() and kicks          # and was kicked
        throttle.update(bandwidth=None, ops=KEEP)
        assert throttle.limiter is None
    finally:
        throttle.close()


def test_limited_disk_serves_n_ops_then_waits_for_the_timer(memory, tmp_path):
    device, kicks, ring, queue = limited_disk_parts(memory, tmp_path)
    try:
        # 3 requests at once, then one more each 100 ms (of the test's clock)
        clock = Clock()
        device.limit(RateLimiter(ops=TokenBucket(3, 300, clock=clock)))
        for index in range(5):
            offer_request(memory, ring, READ, sector=index, data_len=512,
                          status_addr=STATUS + index)
        device.process_queue(0, queue)
        assert [head for head, _ in ring.take_used()] == [0, 3, 6]   # 3 chains of 3
        assert queue.has_available() and not device.wants_more(0)
        assert device.requests["read"] == 3 and device.throttle.waits == 1
        device.process_queue(0, queue)         # kicked early: still nothing
        assert ring.take_used() == [] and device.throttle.waits == 2
        deadline = time.monotonic() + 10
        while not kicks and time.monotonic() < deadline:
            time.sleep(0.01)                   # no busy loop: one timer wakes the queue
        assert kicks == [0]
        clock.now += 0.1                       # one op's worth (100 ms) of refill
        device.process_queue(0, queue)
        assert len(ring.take_used()) == 1      # one request served, the last one waits
        assert device.requests["read"] == 4 and queue.has_available()
    finally:
        device.close()


def test_bandwidth_counts_data_bytes_and_a_large_request_still_runs(memory, tmp_path):
    device, _, ring, queue = limited_disk_parts(memory, tmp_path)
    try:
        device.limit(RateLimiter(bandwidth=TokenBucket(1024, 60_000)))
        offer_request(memory, ring, READ, sector=0, data_len=4096)    # 4x the bucket
        offer_request(memory, ring, READ, sector=8, data_len=512, status_addr=STATUS + 1)
        device.process_queue(0, queue)
        assert len(ring.take_used()) == 1 and memory.read_u8(STATUS) == 0
        assert device.throttle.limiter.bandwidth._budget == pytest.approx(1024 - 4096, abs=1)
        device.limit(None)                     # removing the limiter lets the rest go
        device.process_queue(0, queue)
        assert len(ring.take_used()) == 1 and device.wants_more(0)
    finally:
        device.close()


def frame(length=60):
    return bytes(NET_HDR_SIZE) + b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + bytes(length - 14)


def test_nic_transmit_side_throttled_then_resumes(memory):
    host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = NetDevice(StreamWire(guest_end.detach()), b"\x52\x54\x00\x12\x34\x56", name="net-t")
    kicks = []
    device.kick = kicks.append
    ring, queue = ring_and_queue(memory, 0x1000)
    try:
        device.tx_throttle.set(RateLimiter(ops=TokenBucket(2, 60_000, clock=Clock())))
        for index in range(4):
            memory.write(0x20000 + 0x800 * index, frame())
            ring.add_chain([(0x20000 + 0x800 * index, NET_HDR_SIZE + 60, False)])
        device.process_queue(1, queue)
        assert len(ring.take_used()) == 2 and not device.wants_more(1)
        assert device.stats["tx_frames"] == 2
        device.tx_throttle.update(ops=TokenBucket(0, 0))     # PATCH size 0: off
        device.process_queue(1, queue)
        assert len(ring.take_used()) == 2 and device.stats["tx_frames"] == 4
        host.settimeout(5)
        received = b""
        while len(received) < 4 * (4 + 60):
            received += host.recv(4096)
        assert struct.unpack_from(">I", received)[0] == 60
    finally:
        device.close()
        host.close()
