"""One pass of a queue completes every request it finds and raises one interrupt for
them all, with avail-ring polling off and on (pykvm/devices/virtio/poll.py's
serve_queue; the device's process_queue pops until the ring is empty). No KVM: the
transport runs on a StandInVm with recording interrupt lines."""

import struct
import time

import pytest

from pykvm.devices.pci.msix import CONTROL_ENABLE
from pykvm.devices.virtio.blk import BlockDevice
from pykvm.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.poll import MAX_MAX_NS, configure

from ..fakes import wait_for
from .test_virtio_blk import (HEADER, RING, STATUS, blk_function, bring_up, image,  # noqa: F401
                              memory)

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


class SnoopingLine(RecordingLine):
    """An interrupt line that notes, when it fires, whether the queue's notifications
    were already back on (EVENT_IDX: avail_event caught up with the device's index)."""

    def __init__(self, gsi, queue_of):
        super().__init__(gsi)
        self.queue_of = queue_of
        self.armed_when_fired: list[bool] = []

    def trigger(self) -> None:
        queue = self.queue_of()
        self.armed_when_fired.append(queue._avail_event[0] == queue.last_avail_idx)
        super().trigger()


def test_the_interrupt_comes_after_notifications_are_back_on(memory, image):  # noqa: F811
    """A pass that goes to sleep raises its interrupt last: the driver it wakes sees
    avail_event re-armed (its next request rings the doorbell at once), and no Python of
    the pass runs after the wake-up of the vCPU thread, which needs the GIL. Before issue
    #13's QD32 pass the interrupt came before notifications were re-enabled."""
    vm = StandInVm(memory)
    function = None
    lines = [SnoopingLine(24 + i, lambda: function.queues[0]) for i in range(2)]
    function = VirtioPciDevice(vm, memory, BlockDevice(str(image)), interrupt_lines=lines)
    try:
        configure(function, 0)
        driver = PciDriver(function)
        assert driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX) & 8
        function.config.write(function.msix.offset + 2, 2, CONTROL_ENABLE)
        for vector in range(2):
            function.msix.write(16 * vector + 12, 4, 0)
        ring = DriverRing(memory, RING, 16)
        driver.setup_queue(0, ring, vector=0)
        driver.driver_ok()
        for round_ in range(3):
            with function._lock:                       # the worker sees all or none of them
                for slot in range(REQUESTS):
                    memory.write(HEADER + 16 * slot, struct.pack("<IIQ", 0, 0, slot))
                    ring.add_chain([(HEADER + 16 * slot, 16, False),
                                    (0x20000 + 512 * slot, 512, True), (STATUS + slot, 1, True)])
                ring.set_used_event(ring.used_idx())  # the driver waits: wake it at the next
            driver.notify(0)
            assert wait_for(lambda: lines[0].triggered == round_ + 1)
            assert ring.used_idx() == REQUESTS * (round_ + 1)
        assert lines[0].armed_when_fired == [True, True, True]
    finally:
        function.close()
        vm.close()
