"""Token buckets (pykvm/devices/rate_limiter.py) on a clock the test moves, and a
virtio-rng that a limiter throttles: requests stay in the guest's ring until the
buckets refill, and the device wakes itself."""

import threading
import time

import pytest

from pykvm.devices.rate_limiter import (DelayedKick, RateLimiter, TokenBucket,
                                        format_rate_limit, parse_rate_limit)
from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.queue import Virtqueue
from pykvm.devices.virtio.rng import RngDevice
from pykvm.errors import ConfigError
from pykvm.machine import MachineConfig
from pykvm.memory import GuestMemory


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_bucket_refills_at_its_rate_and_burst_is_spent_once():
    clock = Clock()
    bucket = TokenBucket(size=1000, refill_time_ms=1000, one_time_burst=500, clock=clock)
    bucket.charge(1500)                     # the burst, then the whole bucket
    assert not bucket.ready() and bucket.wait_s() == pytest.approx(0.001, abs=1e-3)
    clock.now += 0.5
    assert bucket.ready()                   # 500 tokens back, the burst is not
    bucket.charge(2500)                     # larger than the bucket: it goes negative
    assert not bucket.ready()
    assert bucket.wait_s() == pytest.approx(2.0, abs=0.01)
    clock.now += 10
    bucket.charge(999)
    assert bucket.ready()                   # never more than `size` tokens banked
    bucket.charge(1)
    assert not bucket.ready()


def test_zero_size_or_refill_limits_nothing_and_negative_is_refused():
    for bucket in (TokenBucket(0, 1000), TokenBucket(1000, 0)):
        bucket.charge(1 << 40)
        assert bucket.unlimited and bucket.ready() and bucket.wait_s() == 0.0
    assert RateLimiter(TokenBucket(0, 5), None).buckets == []
    with pytest.raises(ValueError):
        TokenBucket(-1, 1000)


def test_limiter_needs_every_bucket():
    clock = Clock()
    limiter = RateLimiter(TokenBucket(10_000, 1000, clock=clock), TokenBucket(2, 1000, clock=clock))
    limiter.charge(100, 1)
    assert limiter.ready()
    limiter.charge(100, 1)                  # the ops bucket is empty, bandwidth is not
    assert not limiter.ready() and limiter.throttled == 1
    assert limiter.wait_s() == pytest.approx(0.001, abs=1e-3)
    clock.now += 0.5
    assert limiter.ready()


def buckets_of(limiter):
    return [None if b is None else (b.size, b.refill_time_ms, b.one_time_burst)
            for b in (limiter.bandwidth, limiter.ops)]


@pytest.mark.parametrize("text, expected", [
    ("bandwidth=1048576:1000", [(1048576, 1000, 0), None]),
    ("ops=10:100:5", [None, (10, 100, 5)]),
    ("bandwidth=1:2:3,ops=4:5:6", [(1, 2, 3), (4, 5, 6)])])
def test_text_form_round_trip(text, expected):
    assert buckets_of(parse_rate_limit(text)) == expected
    assert buckets_of(parse_rate_limit(format_rate_limit(*expected))) == expected
    assert parse_rate_limit("") is None and format_rate_limit(None, None) == ""


@pytest.mark.parametrize("text", ["bandwidth=1", "cpu=1:2", "ops=1:2,ops=1:2", "ops=-1:2",
                                  "ops=1:2:3:4", "ops=" + "9" * 30 + ":1", "ops=a:b"])
def test_bad_text_is_one_line(text):
    with pytest.raises(ValueError, match="rate limit"):
        parse_rate_limit(text)
    config = MachineConfig(kernel="/k", rng=True, rng_rate_limit=text)
    with pytest.raises(ConfigError, match="virtio-rng"):
        config.validate()


def test_delayed_kick_fires_once_at_the_earliest_time():
    fired = []
    event = threading.Event()
    kick = DelayedKick(lambda: (fired.append(time.monotonic()), event.set()), "test-kick")
    try:
        start = time.monotonic()
        kick.schedule(5.0)
        kick.schedule(0.05)                 # the earlier wins
        assert event.wait(5)
        assert len(fired) == 1 and fired[0] - start < 4
    finally:
        kick.close()


def test_throttled_rng_leaves_requests_in_the_ring_and_wakes_itself():
    clock = Clock()
    with GuestMemory.anonymous(1 << 20) as memory:
        ring = DriverRing(memory, 0x1000, 64)
        queue = Virtqueue(memory, 64)
        queue.desc_addr, queue.avail_addr, queue.used_addr = \
            ring.desc_addr, ring.avail_addr, ring.used_addr
        queue.activate(indirect=False, event_idx=False)
        limiter = RateLimiter(TokenBucket(64, 1000, clock=clock), None)
        device = RngDevice(source=lambda n: b"\x5a" * n, rate_limiter=limiter)
        kicks = []
        device.kick = kicks.append
        try:
            for index in range(3):
                ring.add_chain([(0x10000 + 0x100 * index, 64, True)])
            device.process_queue(0, queue)
            assert ring.take_used() == [(0, 64)]        # one request's worth of bytes
            assert not device.wants_more(0) and queue.has_available()
            deadline = time.monotonic() + 10
            while not kicks and time.monotonic() < deadline:
                clock.now += 0.25                     # the bucket refills...
                time.sleep(0.02)                      # ...and the device's timer fires
            assert kicks == [0]
            clock.now += 1
            device.process_queue(0, queue)
            assert ring.take_used() == [(1, 64)] and device.wants_more(0) is False
            assert device.bytes_given == 128
        finally:
            device.close()
