"""Adaptive polling of a virtqueue's avail ring (pykvm/devices/virtio/poll.py): the
window's grow/shrink rule, its cap and off switch, the back-off after spins that find
nothing, one spin against a real ring, and the notification suppression it relies on
(queue.py: suppress_notification / enable_notification). No KVM needed; the KVM side
(a guest's requests, the give-up race) is tests/kvm/test_virtio_poll.py."""

import mmap

import pytest

from pykvm.devices.virtio import poll
from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.poll import (BUSY, FOUND, GIVE_UP, GROW_START_NS, MAX_BACKOFF,
                                       OPEN_AFTER, STOPPED, TIMEOUT, PollWindow, spin)
from pykvm.devices.virtio.queue import (USED_F_NO_NOTIFY, Virtqueue, VirtqueueError,
                                        need_event)
from pykvm.errors import ConfigError
from pykvm.machine.config import MachineConfig
from pykvm.memory import GuestMemory, MemoryRegion

from .test_virtqueue import DATA, make_queue, memory  # noqa: F401 - the fixture

MAX = 32_000


# --- the window rule ------------------------------------------------------------------------
def test_window_opens_at_4_us_and_doubles_up_to_the_cap():
    window = PollWindow(max_ns=MAX)
    sizes = []
    for _ in range(OPEN_AFTER + 5):
        window.adjust(MAX)             # idle just within the cap: a longer window would catch it
        sizes.append(window.ns)
    assert sizes == [0] * (OPEN_AFTER - 1) + [GROW_START_NS, 8_000, 16_000, 32_000, 32_000,
                                              32_000]


def test_a_shut_window_does_not_open_on_a_blip():
    window = PollWindow(max_ns=MAX)
    for _ in range(3):
        for _ in range(OPEN_AFTER - 1):
            window.adjust(1_000)
        window.adjust(MAX + 1)         # one long idle period: start counting again
    assert window.ns == 0


def test_work_caught_inside_the_window_changes_nothing():
    window = PollWindow(max_ns=MAX, ns=16_000)
    window.adjust(10_000)
    assert window.ns == 16_000


def test_idle_longer_than_the_cap_halves_the_window_down_to_off():
    window = PollWindow(max_ns=MAX, ns=MAX)
    sizes = []
    while window.ns:
        window.adjust(MAX + 1)
        sizes.append(window.ns)
    assert sizes == [16_000, 8_000, 4_000, 2_000, 1_000, 0]


def test_cap_zero_is_off():
    window = PollWindow(max_ns=0)
    for block in (0, 1_000, 10_000, 10**9):
        window.adjust(block)
        assert window.ns == 0


def test_woke_adjusts_from_the_time_the_ring_went_idle():
    window = PollWindow(max_ns=MAX)
    window.woke(5_000)                 # never idle: nothing to learn
    assert window.ns == 0
    window.ns = GROW_START_NS
    window.went_idle(1_000)
    window.went_idle(2_000)            # still the same idle period
    window.woke(1_000 + MAX)
    assert window.ns == 2 * GROW_START_NS and window.idle_since == 0


def test_spins_that_find_nothing_stop_polling_with_a_doubling_back_off():
    window = PollWindow(max_ns=MAX, ns=MAX)
    for round_ in range(13):
        window.ns = MAX
        for _ in range(GIVE_UP):
            window.spun(TIMEOUT)
        assert window.ns == 0 and window.misses == 0
        assert window.skip == window.backoff == min(MAX_BACKOFF, 2 ** round_)
    assert window.give_ups == 13
    window.skip = 2                     # while backing off, wake-ups do not reopen the window
    for _ in range(2):
        window.went_idle(1_000)
        window.woke(2_000)
        assert window.ns == 0
    assert window.skip == 0
    for _ in range(OPEN_AFTER):
        window.went_idle(1_000)
        window.woke(2_000)
    assert window.ns == GROW_START_NS


def test_a_spin_that_finds_work_resets_the_misses_and_the_back_off():
    window = PollWindow(max_ns=MAX, ns=MAX, backoff=8)
    for _ in range(GIVE_UP - 1):
        window.spun(TIMEOUT)
    window.spun(FOUND)
    assert (window.misses, window.backoff, window.found) == (0, 0, 1)
    window.spun(TIMEOUT)
    assert window.ns == MAX             # one miss is not a give-up


def test_a_busy_host_halves_the_window():
    window = PollWindow(max_ns=MAX, ns=MAX)
    window.spun(BUSY)
    assert (window.ns, window.busy, window.misses) == (16_000, 1, 1)
    window.spun(STOPPED)
    assert window.misses == 1           # a reset or stop is nobody's miss


@pytest.mark.parametrize("max_ns", [-1, poll.MAX_MAX_NS + 1])
def test_a_cap_out_of_range_is_refused(max_ns):
    with pytest.raises(ConfigError, match="poll window"):
        PollWindow(max_ns=max_ns)


def test_machine_config_default_is_poll_py_s_and_is_checked():
    assert MachineConfig.virtio_poll_us * 1000 == poll.DEFAULT_MAX_NS
    config = MachineConfig(flat="x.bin", virtio_poll_us=1001)
    with pytest.raises(ConfigError, match="virtio-poll-us"):
        config.validate()


# --- one spin against a ring ---------------------------------------------------------------
class Transport:
    """What serve_queue / spin read of a transport (for the spin's stop check)."""
    running, broken = True, False


def test_spin_finds_a_published_request_at_once(memory):  # noqa: F811
    ring, queue = make_queue(memory, event_idx=True)
    ring.add_chain([(DATA, 16, False)])
    assert spin(PollWindow(max_ns=MAX, ns=MAX), queue, lambda: True) == FOUND


def test_spin_ends_at_the_window_on_an_empty_ring(memory):  # noqa: F811
    ring, queue = make_queue(memory, event_idx=True)
    assert spin(PollWindow(max_ns=MAX, ns=2_000), queue, lambda: True) in (TIMEOUT, BUSY)


def test_spin_stops_when_the_queue_is_reset_or_the_device_stops(memory):  # noqa: F811
    ring, queue = make_queue(memory, event_idx=True)
    assert spin(PollWindow(max_ns=MAX, ns=poll.MAX_MAX_NS), queue, lambda: False) == STOPPED
    queue.reset()
    assert spin(PollWindow(max_ns=MAX, ns=poll.MAX_MAX_NS), queue, lambda: True) == STOPPED


# --- notification suppression (virtio 1.2 sections 2.7.7, 2.7.10) --------------------------
def test_suppression_with_event_idx_keeps_the_driver_from_notifying(memory):  # noqa: F811
    ring, queue = make_queue(memory, event_idx=True)
    for _ in range(3):                  # the device has consumed three
        ring.add_chain([(DATA, 16, False)])
        queue.add_used(queue.pop().head, 0)
    queue.suppress_notification()
    old = ring.avail_idx
    for _ in range(7):                  # a driver publishing any number (up to the queue size)
        ring.add_chain([(DATA, 16, False)])
        assert not need_event(ring.avail_event(), ring.avail_idx, old)
        old = ring.avail_idx
    while queue.pop() is not None:
        pass
    assert queue.enable_notification() is False
    ring.add_chain([(DATA, 16, False)])
    assert need_event(ring.avail_event(), ring.avail_idx, old)   # notifies again


def test_suppression_without_event_idx_sets_and_clears_no_notify(memory):  # noqa: F811
    ring, queue = make_queue(memory, event_idx=False)
    used_flags = memory.view(ring.used_addr, 2).cast("H")
    queue.suppress_notification()
    assert used_flags[0] == USED_F_NO_NOTIFY
    assert queue.enable_notification() is False
    assert used_flags[0] == 0


def test_enable_notification_reports_what_came_while_suppressed(memory):  # noqa: F811
    """The spec's race: a buffer published while notifications were off comes without a
    notify, so re-enabling must look at the ring again and say so."""
    for event_idx in (True, False):
        ring, queue = make_queue(memory, event_idx=event_idx)
        queue.suppress_notification()
        ring.add_chain([(DATA, 16, False)])
        assert queue.enable_notification() is True


# --- the chain walk's fast path for the first RAM region keeps the other regions' checks --
def test_buffers_in_a_second_region_and_in_the_gap():
    size = 1 << 20
    regions = [MemoryRegion(0, size, mmap.mmap(-1, size)),
               MemoryRegion(4 * size, size, mmap.mmap(-1, size))]
    ram = GuestMemory(regions)
    try:
        ring, queue = make_queue(ram)
        ring.add_chain([(4 * size + 0x100, 64, False)])
        chain = queue.pop()
        ram.write(4 * size + 0x100, b"second")
        assert bytes(chain.readable[0][:6]) == b"second"
        for addr, length in ((2 * size, 16), (size - 8, 16), (5 * size - 8, 16)):
            ring.add_chain([(addr, length, False)])
            with pytest.raises(VirtqueueError, match="outside guest RAM"):
                queue.pop()
    finally:
        for region in regions:
            region.close()
