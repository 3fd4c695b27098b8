"""The split virtqueue against normal and hostile drivers (no KVM needed).

The hostile cases are the rules in pykvm/devices/virtio/queue.py: every
violation must end as VirtqueueError (which the transport turns into
NEEDS_RESET), never as another exception, and no buffer handed to a device may
lie outside guest RAM.
"""


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.queue import (DESC_F_INDIRECT, DESC_F_NEXT,
                                        DescriptorChain, Virtqueue, VirtqueueError, gather,
                                        need_event, scatter, slice_views)
from pykvm.memory import GuestMemory

RAM = 1 << 20
RING = 0x1000
DATA = 0x10000
SIZE = 8


@pytest.fixture(scope="module")
def memory():
    with GuestMemory.anonymous(RAM) as ram:
        yield ram


def make_queue(memory, *, size=SIZE, indirect=True, event_idx=False):
    ring = DriverRing(memory, RING, size)
    queue = Virtqueue(memory, size)
    queue.desc_addr, queue.avail_addr, queue.used_addr = ring.desc_addr, ring.avail_addr, ring.used_addr
    queue.activate(indirect=indirect, event_idx=event_idx)
    return ring, queue


def address_of(memory, view: memoryview) -> int:
    """Guest-physical address of a view handed out by GuestMemory (for checks)."""
    import ctypes
    region = memory.regions[0]
    base = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return region.guest_addr + base - region.host_addr


# --- normal drivers ------------------------------------------------------------------------------
def test_chain_of_readable_then_writable_buffers(memory):
    ring, queue = make_queue(memory)
    memory.write(DATA, b"hello")
    head = ring.add_chain([(DATA, 5, False), (DATA + 0x100, 16, True), (DATA + 0x200, 1, True)])
    chain = queue.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hello"]
    assert [len(v) for v in chain.writable] == [16, 1]
    assert queue.pop() is None


def test_buffers_are_zero_copy_views_of_guest_ram(memory):
    ring, queue = make_queue(memory)
    ring.add_chain([(DATA, 8, True)])
    chain = queue.pop()
    chain.writable[0][:] = b"ABCDEFGH"
    assert memory.read(DATA, 8) == b"ABCDEFGH"


def test_used_ring_carries_head_and_length(memory):
    ring, queue = make_queue(memory)
    first = ring.add_chain([(DATA, 4, True)])
    second = ring.add_chain([(DATA + 8, 4, True)])
    for expected in (first, second):
        chain = queue.pop()
        assert chain.head == expected
        queue.add_used(chain.head, 3)
    assert ring.take_used() == [(first, 3), (second, 3)]


def test_indexes_wrap_around_65536(memory):
    ring, queue = make_queue(memory)
    ring.avail_idx = queue.last_avail_idx = 0xFFFF
    queue.used_idx = 0xFFFF
    ring.last_used = 0xFFFF
    ring.set_avail_idx(0xFFFF)
    head = ring.add_chain([(DATA, 4, True)])
    chain = queue.pop()
    assert chain.head == head and queue.last_avail_idx == 0
    queue.add_used(head, 1)
    assert ring.used_idx() == 0
    assert ring.take_used() == [(head, 1)]


def test_indirect_table(memory):
    ring, queue = make_queue(memory)
    memory.write(DATA, b"header..")
    ring.add_indirect(DATA + 0x1000, [(DATA, 8, False), (DATA + 0x100, 32, True)])
    chain = queue.pop()
    assert [bytes(v) for v in chain.readable] == [b"header.."]
    assert chain.writable_len == 32


def test_interrupt_suppression_without_event_idx(memory):
    ring, queue = make_queue(memory)
    ring.add_chain([(DATA, 4, True)])
    queue.add_used(queue.pop().head, 0)
    assert queue.should_interrupt()
    assert not queue.should_interrupt()   # nothing new since
    ring.set_avail_flags(1)                # VIRTQ_AVAIL_F_NO_INTERRUPT
    ring.add_chain([(DATA, 4, True)])
    queue.add_used(queue.pop().head, 0)
    assert not queue.should_interrupt()


def test_event_idx_both_ways(memory):
    ring, queue = make_queue(memory, event_idx=True)
    for _ in range(3):
        ring.add_chain([(DATA, 4, True)])
    ring.set_used_event(2)   # "interrupt me when used idx passes 2"
    for _ in range(2):
        queue.add_used(queue.pop().head, 0)
    assert not queue.should_interrupt()   # used idx 2: not past 2 yet
    queue.add_used(queue.pop().head, 0)
    assert queue.should_interrupt()       # used idx 3
    assert not queue.enable_notification()
    assert ring.avail_event() == 3        # "notify me from avail idx 3 on"
    ring.add_chain([(DATA, 4, True)])
    assert queue.enable_notification()   # the race check sees the new buffer


@pytest.mark.parametrize("event, new, old, expected", [
    (0, 1, 0, True), (1, 1, 0, False), (5, 10, 4, True), (10, 10, 4, False),
    (0xFFFF, 0, 0xFFFE, True), (3, 3, 3, False)])
def test_need_event(event, new, old, expected):
    assert need_event(event, new, old) is expected


# --- hostile drivers: each rule ------------------------------------------------------------------
def expect_error(queue, match):
    with pytest.raises(VirtqueueError, match=match):
        queue.pop()


def test_buffer_outside_ram(memory):
    ring, queue = make_queue(memory)
    ring.add_chain([(RAM - 4, 8, True)])
    expect_error(queue, "outside guest RAM")


def test_length_that_would_overflow_64_bits(memory):
    ring, queue = make_queue(memory)
    ring.add_chain([((1 << 64) - 16, 0xFFFFFFFF, False)])
    expect_error(queue, "outside guest RAM")


def test_descriptor_loop(memory):
    ring, queue = make_queue(memory)
    ring.write_descriptor(0, DATA, 4, DESC_F_NEXT, 1)
    ring.write_descriptor(1, DATA, 4, DESC_F_NEXT, 0)
    ring.publish(0)
    expect_error(queue, "a loop")


def test_chain_longer_than_the_queue(memory):
    ring, queue = make_queue(memory)
    for i in range(SIZE):
        ring.write_descriptor(i, DATA, 4, DESC_F_NEXT, (i + 1) % SIZE)
    ring.publish(0)
    expect_error(queue, "longer than")


def test_next_index_out_of_range(memory):
    ring, queue = make_queue(memory)
    ring.write_descriptor(0, DATA, 4, DESC_F_NEXT, SIZE + 3)
    ring.publish(0)
    expect_error(queue, "out of range")


def test_head_index_out_of_range(memory):
    ring, queue = make_queue(memory)
    ring.publish(SIZE)
    expect_error(queue, "out of range")


def test_avail_index_running_too_far_ahead(memory):
    ring, queue = make_queue(memory)
    ring.set_avail_idx(SIZE + 1)
    expect_error(queue, "ahead")


def test_readable_after_writable(memory):
    ring, queue = make_queue(memory)
    ring.add_chain([(DATA, 4, True), (DATA + 8, 4, False)])
    expect_error(queue, "readable buffer after a writable")


@pytest.mark.parametrize("length, match", [(0, "not 1.."), (24, "not 1.."),
                                           (16 * (SIZE + 1), "not 1..")])
def test_indirect_table_of_bad_length(memory, length, match):
    ring, queue = make_queue(memory)
    ring.write_descriptor(0, DATA + 0x1000, length, DESC_F_INDIRECT)
    ring.publish(0)
    expect_error(queue, match)


def test_indirect_table_outside_ram(memory):
    ring, queue = make_queue(memory)
    ring.write_descriptor(0, RAM - 16, 32, DESC_F_INDIRECT)
    ring.publish(0)
    expect_error(queue, "outside guest RAM")


def test_nested_indirect_table(memory):
    ring, queue = make_queue(memory)
    ring.write_descriptor(0, DATA, 16, DESC_F_INDIRECT, table=DATA + 0x1000)
    ring.write_descriptor(0, DATA + 0x1000, 16, DESC_F_INDIRECT)
    ring.publish(0)
    expect_error(queue, "another indirect")


def test_loop_inside_an_indirect_table(memory):
    ring, queue = make_queue(memory)
    table = DATA + 0x1000
    ring.write_descriptor(0, DATA, 4, DESC_F_NEXT, 1, table=table)
    ring.write_descriptor(1, DATA, 4, DESC_F_NEXT, 0, table=table)
    ring.write_descriptor(0, table, 32, DESC_F_INDIRECT)
    ring.publish(0)
    expect_error(queue, "a loop")


def test_indirect_with_next_flag(memory):
    ring, queue = make_queue(memory)
    ring.write_descriptor(0, DATA + 0x1000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    ring.publish(0)
    expect_error(queue, "NEXT")


def test_indirect_not_negotiated(memory):
    ring, queue = make_queue(memory, indirect=False)
    ring.add_indirect(DATA + 0x1000, [(DATA, 4, True)])
    expect_error(queue, "not negotiated")


@pytest.mark.parametrize("field, value, match", [
    ("desc_addr", RAM - 64, "outside guest RAM"), ("used_addr", RAM - 8, "outside guest RAM"),
    ("avail_addr", 0x1001, "aligned"), ("size", 6, "power of two"), ("size", 0, "power of two"),
    ("size", 2 * SIZE, "power of two")])
def test_bad_ring_registers_are_refused_at_activation(memory, field, value, match):
    queue = Virtqueue(memory, SIZE)
    queue.desc_addr, queue.avail_addr, queue.used_addr = 0x1000, 0x1100, 0x1200
    setattr(queue, field, value)
    with pytest.raises(VirtqueueError, match=match):
        queue.activate(indirect=True, event_idx=True)


# --- property: whatever the guest writes, the queue either errs cleanly or hands out
# buffers that lie inside RAM ------------------------------------------------------------------
descriptor = st.tuples(
    st.one_of(st.integers(0, RAM + 0x100), st.integers(0, (1 << 64) - 1)),   # addr
    st.one_of(st.integers(0, 0x2000), st.integers(0, (1 << 32) - 1)),      # len
    st.integers(0, 0xFFFF),                                                 # flags
    st.integers(0, 0xFFFF))                                                 # next


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptor, min_size=SIZE, max_size=SIZE),
       heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4),
       avail_idx=st.integers(0, 0xFFFF), indirect_table=st.lists(descriptor, max_size=12))
def test_random_rings_never_escape_guest_ram(memory, table, heads, avail_idx, indirect_table):
    ring, queue = make_queue(memory)
    for i, (addr, length, flags, next_index) in enumerate(table):
        ring.write_descriptor(i, addr, length, flags, next_index)
    # Some descriptors point at a plausible indirect table full of random entries.
    for i, (addr, length, flags, next_index) in enumerate(indirect_table):
        ring.write_descriptor(i, addr, length, flags, next_index, table=DATA)
    for head in heads:
        ring.publish(head % (SIZE + 2))
    if avail_idx % 3 == 0:
        ring.set_avail_idx(avail_idx)
    for _ in range(len(heads) + 1):
        try:
            chain = queue.pop()
        except VirtqueueError:
            return
        if chain is None:
            return
        assert isinstance(chain, DescriptorChain)
        for view in chain.readable + chain.writable:
            if len(view):
                start = address_of(memory, view)
                assert 0 <= start and start + len(view) <= RAM
        assert len(chain.readable) + len(chain.writable) <= 2 * SIZE
        queue.add_used(chain.head, 0)


# --- scatter/gather helpers ------------------------------------------------------------------------
def test_scatter_gather_and_slices():
    a, b = bytearray(3), bytearray(5)
    views = [memoryview(a), memoryview(b)]
    assert scatter(views, b"abcdefgh!") == 8
    assert gather(views, 100) == b"abcdefgh"
    assert gather(views, 4) == b"abcd"
    assert [bytes(v) for v in slice_views(views, 2, 3)] == [b"c", b"de"]
    assert [bytes(v) for v in slice_views(views, 7)] == [b"h"]
    assert slice_views(views, 8) == []
