"""One pass of a queue completes every request it finds and raises one interrupt for
them all, with avail-ring polling off and on (pykvm/devices/virtio/poll.py's
serve_queue; the device's process_queue pops until the ring is empty). No KVM: the
transport runs on a StandInVm with recording interrupt lines."""

import struct
import time

import pytest

from pykvm.devices.virtio.poll import MAX_MAX_NS, configure

from ..fakes import wait_for
from .test_virtio_blk import HEADER, STATUS, blk_function, bring_up, image, memory  # noqa: F401

REQUESTS = 5                                   # 3 descriptors each, in a ring of 16


@pytest.mark.parametrize("poll_ns", [0, MAX_MAX_NS], ids=["poll_off", "poll_on"])
def test_one_pass_completes_every_request_with_one_interrupt(blk_function, memory,  # noqa: F811
                                                              poll_ns):
    function, lines, _ = blk_function
    configure(function, poll_ns)
    driver, ring = bring_up(function, memory)          # the queue's MSI-X vector: lines[0]
    with function._lock:                               # the worker sees all or none of them
        for slot in range(REQUESTS):
            memory.write(HEADER + 16 * slot, struct.pack("<IIQ", 0, 0, slot))
            ring.add_chain([(HEADER + 16 * slot, 16, False), (0x20000 + 512 * slot, 512, True),
                            (STATUS + slot, 1, True)])
        function.poll_windows[0].ns = poll_ns          # the next idle ring is polled (on)
    driver.notify(0)
    assert wait_for(lambda: ring.used_idx() == REQUESTS)
    time.sleep(0.1)                                    # room for a second interrupt, if any
    assert lines[0].triggered == 1
    assert memory.read(STATUS, REQUESTS) == bytes(REQUESTS)
    assert sorted(head for head, _ in ring.take_used()) == list(range(0, 3 * REQUESTS, 3))
