"""virtio-net's receive with VIRTIO_NET_F_MRG_RXBUF as a Linux driver negotiates it
(GUEST_CSUM and GUEST_TSO4: the largest frame is 64 KiB, the buffers ~1.5 KiB): each
frame is read once into the device's bounce buffer and copied into only as many of
the guest's buffers as it takes (pykvm/devices/virtio/net_receive.py). Before, the
device read nothing until the guest offered 64 KiB of buffers.

A real TAP in a throwaway network namespace (test_net.py's ``netns``), the device
driven synchronously; no frame leaves the namespace.
"""

import select
import struct

import pytest

from pykvm.devices.virtio.net import (NET_HDR_SIZE, RECEIVE_QUEUE, VIRTIO_NET_F_GUEST_CSUM,
                                      VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF)
from pykvm.devices.virtio.queue import VirtqueueError

from .test_net import RX_BUFFERS, Nic, frame, ip, memory, netns  # noqa: F401 - fixtures

LINUX = VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4


def num_buffers(memory, address: int) -> int:
    return struct.unpack_from("<H", memory.read(address, NET_HDR_SIZE), 10)[0]


def offer(nic, first: int, count: int, size: int) -> None:
    for i in range(first, first + count):
        nic.rx.add_chain([(RX_BUFFERS + 0x1000 * i, size, True)])


def tap_has_frames(nic) -> bool:
    return bool(select.select([nic.device.fd], [], [], 0)[0])


def test_a_frame_takes_one_buffer_of_a_few_offered(memory, netns):
    nic = Nic(memory, LINUX, size=64)
    offer(nic, 0, 8, 1536)                      # 12 KiB: far from a 64 KiB frame's room
    sent = [frame(b"a" * 1486), frame(b"b" * 100)]
    for data in sent:
        nic.sock.send(data)
    assert nic.receive(2) == [(0, NET_HDR_SIZE + len(sent[0])), (1, NET_HDR_SIZE + len(sent[1]))]
    for i, data in enumerate(sent):
        assert num_buffers(memory, RX_BUFFERS + 0x1000 * i) == 1
        assert memory.read(RX_BUFFERS + 0x1000 * i + NET_HDR_SIZE, len(data)) == data
    assert nic.device.stats["rx_frames"] == 2
    nic.close()


def test_a_frame_spread_over_two_buffers_says_so(memory, netns):
    nic = Nic(memory, LINUX, size=64)
    offer(nic, 0, 4, 1024)
    data = frame(bytes(range(250)) * 6)                             # 1514 bytes
    nic.sock.send(data)
    small = frame(b"next")
    nic.sock.send(small)
    used = nic.receive(3)
    # only the buffers each frame takes: the first two, then the third
    assert used == [(0, 1024), (1, NET_HDR_SIZE + len(data) - 1024),
                    (2, NET_HDR_SIZE + len(small))]
    assert num_buffers(memory, RX_BUFFERS) == 2
    landed = memory.read(RX_BUFFERS, 1024) + memory.read(RX_BUFFERS + 0x1000, 1024)
    assert landed[NET_HDR_SIZE:NET_HDR_SIZE + len(data)] == data
    assert num_buffers(memory, RX_BUFFERS + 0x2000) == 1
    nic.close()


def test_one_frame_waits_for_buffers_the_rest_stay_in_the_tap(memory, netns):
    nic = Nic(memory, LINUX, size=64)
    offer(nic, 0, 1, 1024)                      # too little for the first frame
    sent = [frame(b"1" * 1400), frame(b"2" * 60)]
    for data in sent:
        nic.sock.send(data)
    for _ in range(3):                          # however often the device runs
        nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
        assert nic.rx.take_used() == []
        assert nic.device.wants_more(RECEIVE_QUEUE)
        assert tap_has_frames(nic)              # the second frame was never read
    assert nic.device.stats["rx_waits_for_buffers"] == 3
    offer(nic, 1, 2, 1024)
    used = nic.receive(3)
    assert used == [(0, 1024), (1, NET_HDR_SIZE + len(sent[0]) - 1024),
                    (2, NET_HDR_SIZE + len(sent[1]))]
    assert num_buffers(memory, RX_BUFFERS) == 2
    landed = memory.read(RX_BUFFERS, 1024) + memory.read(RX_BUFFERS + 0x1000, 1024)
    assert landed[NET_HDR_SIZE:NET_HDR_SIZE + len(sent[0])] == sent[0]
    assert memory.read(RX_BUFFERS + 0x2000 + NET_HDR_SIZE, len(sent[1])) == sent[1]
    assert not tap_has_frames(nic)
    nic.close()


def test_a_frame_longer_than_the_mtu_allows_is_dropped_and_the_buffers_reused(memory, netns):
    # Without TSO the largest frame is MTU-sized: a longer one (the host raised the
    # TAP's MTU) reaches the bounce buffer's spare byte.
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF, size=64)
    ip("link", "set", "pnic0", "mtu", "4000")
    offer(nic, 0, 8, 512)
    nic.sock.send(frame(b"L" * 3000))
    small = frame(b"ok" * 40)
    nic.sock.send(small)
    assert nic.receive(1) == [(0, NET_HDR_SIZE + len(small))]
    assert memory.read(RX_BUFFERS + NET_HDR_SIZE, len(small)) == small
    assert num_buffers(memory, RX_BUFFERS) == 1
    assert nic.device.stats["rx_dropped_too_long"] == 1
    assert nic.device.stats["rx_frames"] == 1
    nic.close()


def test_an_injected_reply_spreads_over_mergeable_buffers(memory, netns):
    nic = Nic(memory, LINUX, size=64)
    offer(nic, 0, 2, 1024)
    reply = frame(b"m" * 1400)                  # what an in-VMM service (MMDS) answers
    nic.device._injected.append(reply)
    assert nic.receive(2) == [(0, 1024), (1, NET_HDR_SIZE + len(reply) - 1024)]
    landed = memory.read(RX_BUFFERS, 1024) + memory.read(RX_BUFFERS + 0x1000, 1024)
    assert landed[:NET_HDR_SIZE] == bytes(10) + b"\x02\x00"        # num_buffers 2
    assert landed[NET_HDR_SIZE:NET_HDR_SIZE + len(reply)] == reply
    nic.close()


@pytest.mark.parametrize("second, message", [
    ([(RX_BUFFERS + 0x1000, 64, False), (RX_BUFFERS + 0x2000, 1024, True)], "device-readable"),
    ([(RX_BUFFERS + 0x1000, 8, True)], "cannot hold"),
])
def test_a_bad_second_buffer_is_a_virtqueue_error(memory, netns, second, message):
    nic = Nic(memory, LINUX, size=64)
    offer(nic, 0, 1, 1024)
    nic.rx.add_chain(second)
    nic.sock.send(frame(b"x" * 1400))           # takes the second chain too
    with pytest.raises(VirtqueueError, match=message):
        nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
    nic.close()


def test_a_frame_that_would_pass_iov_max_descriptors_is_dropped_and_the_buffers_kept(
        memory, netns):
    # Indirect chains of 250 one-byte buffers: a 1212-byte frame needs five, 1250
    # descriptors, more than one frame may use (IOV_MAX, 1024). It is dropped as too
    # long for the buffers; the four held and the fifth are the next frames'.
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF, size=256)     # tables up to the queue size
    for chain in range(5):
        nic.rx.add_indirect(0x300000 + 0x1000 * chain,
                            [(RX_BUFFERS + 250 * chain + i, 1, True) for i in range(250)])
    nic.sock.send(frame(b"B" * 1186))
    medium = frame(b"m" * 380)
    nic.sock.send(medium)
    assert nic.receive(2) == [(0, 250), (1, NET_HDR_SIZE + len(medium) - 250)]
    assert num_buffers(memory, RX_BUFFERS) == 2
    assert memory.read(RX_BUFFERS + NET_HDR_SIZE, len(medium)) == medium
    assert nic.device.stats["rx_dropped_too_long"] == 1
    assert nic.device.stats["rx_chains_too_fragmented"] == 0
    nic.close()
