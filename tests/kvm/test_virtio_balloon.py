"""virtio-balloon (pykvm/devices/virtio/balloon.py) driven through its queues as Linux's
virtio_balloon driver drives them, and as a hostile one would; pages given back are
really gone from the host (the memfd's allocated blocks drop, the page reads zero)."""

import io
import os
import struct
import time

import pytest

from pykvm.devices.virtio.balloon import (DEFLATE, INFLATE, MAX_PFNS_PER_REQUEST, STATS,
                                          VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
                                          VIRTIO_BALLOON_F_STATS_VQ, BalloonDevice, BalloonSpec)
from pykvm.devices.virtio.driver import DriverRing, PciDriver, StandInVm
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.queue import Virtqueue, VirtqueueError
from pykvm.errors import ConfigError
from pykvm.layout import PAGE_SIZE
from pykvm.memory import GuestMemory

from ..conftest import needs_kvm

RAM = 4 << 20
RINGS = 0x1000                  # three rings of 256 entries, 0x3000 apart
PFN_LIST = 0x10000
BALLOONED = 0x100000            # the pages the "guest" gives away
COUNT = 64


@pytest.fixture
def memory():
    with GuestMemory.anonymous(RAM) as ram:
        yield ram


class Balloon:
    """The device with its queues wired to driver-side rings (no transport)."""

    def __init__(self, memory, spec=BalloonSpec(stats_interval_s=0)):
        self.memory = memory
        self.device = BalloonDevice(memory, spec)
        self.rings, self.queues = [], []
        for index, size in enumerate(self.device.queue_sizes):
            ring = DriverRing(memory, RINGS + 0x3000 * index, size)
            queue = Virtqueue(memory, size)
            queue.desc_addr, queue.avail_addr, queue.used_addr = \
                ring.desc_addr, ring.avail_addr, ring.used_addr
            queue.activate(indirect=True, event_idx=False)
            self.rings.append(ring)
            self.queues.append(queue)
        self.kicks = []
        self.device.kick = self.kicks.append

    def send_pfns(self, index, pfns, at=PFN_LIST):
        self.memory.write(at, struct.pack(f"<{len(pfns)}I", *pfns))
        head = self.rings[index].add_chain([(at, 4 * len(pfns), False)])
        self.device.process_queue(index, self.queues[index])
        return head

    def used(self, index):
        return self.rings[index].take_used()


def allocated_bytes(memory):
    return os.fstat(memory.fd).st_blocks * 512


def test_inflate_gives_pages_back_to_the_host(memory):
    balloon = Balloon(memory)
    memory.fill(BALLOONED, COUNT * PAGE_SIZE, 0xA5)
    memory.fill(PFN_LIST, PAGE_SIZE, 0)         # the request's own page, mapped already
    before = allocated_bytes(memory)
    pfns = [BALLOONED // PAGE_SIZE + i for i in range(COUNT)]
    head = balloon.send_pfns(INFLATE, pfns)
    assert balloon.used(INFLATE) == [(head, 0)]
    assert before - allocated_bytes(memory) >= COUNT * PAGE_SIZE
    assert memory.read(BALLOONED, COUNT * PAGE_SIZE) == bytes(COUNT * PAGE_SIZE)
    assert balloon.device.discarded_pages == COUNT
    # Deflate: the pages are the guest's again (touching them maps fresh ones).
    head = balloon.send_pfns(DEFLATE, pfns[::-1])
    assert balloon.used(DEFLATE) == [(head, 0)]
    assert balloon.device.returned_pages == COUNT
    memory.fill(BALLOONED, PAGE_SIZE, 1)
    assert memory.read(BALLOONED, 1) == b"\x01"


def test_scattered_pfns_only_those_pages_go(memory):
    balloon = Balloon(memory)
    memory.fill(BALLOONED, 8 * PAGE_SIZE, 0x5A)
    first = BALLOONED // PAGE_SIZE
    balloon.send_pfns(INFLATE, [first + 6, first, first + 2, first + 3])
    kept = [memory.read(BALLOONED + i * PAGE_SIZE, 1) for i in range(8)]
    assert kept == [b"\0", b"\x5a", b"\0", b"\0", b"\x5a", b"\x5a", b"\0", b"\x5a"]


@pytest.mark.parametrize("bad", [RAM // PAGE_SIZE, 0xFFFFFFFF, (RAM // PAGE_SIZE) + 1000])
def test_a_pfn_outside_ram_is_refused_before_any_page_goes(memory, bad):
    balloon = Balloon(memory)
    memory.fill(BALLOONED, PAGE_SIZE, 0x77)
    with pytest.raises(VirtqueueError, match="not guest RAM"):
        balloon.send_pfns(INFLATE, [BALLOONED // PAGE_SIZE, bad])
    assert memory.read(BALLOONED, 1) == b"\x77"
    with pytest.raises(VirtqueueError):
        balloon.send_pfns(DEFLATE, [bad])


def test_a_request_is_bounded(memory):
    balloon = Balloon(memory)
    memory.fill(BALLOONED, PAGE_SIZE, 0x77)
    huge = [BALLOONED // PAGE_SIZE] * (MAX_PFNS_PER_REQUEST + 1)
    with pytest.raises(VirtqueueError, match="at most"):
        balloon.send_pfns(INFLATE, huge)
    assert memory.read(BALLOONED, 1) == b"\x77"
    # A buffer that is not a whole number of PFNs: the tail byte is ignored.
    memory.write(PFN_LIST, struct.pack("<I", BALLOONED // PAGE_SIZE) + b"\x01")
    head = balloon.rings[INFLATE].add_chain([(PFN_LIST, 5, False)])
    balloon.device.process_queue(INFLATE, balloon.queues[INFLATE])
    assert balloon.used(INFLATE) == [(head, 0)] and memory.read(BALLOONED, 1) == b"\0"


def test_target_and_actual_in_the_configuration(memory):
    balloon = Balloon(memory, BalloonSpec(target_pages=16))
    changes = []
    balloon.device.config_changed = lambda: changes.append(1)
    assert struct.unpack("<II", balloon.device.config_bytes()) == (16, 0)
    balloon.device.set_target(256)
    assert changes == [1] and balloon.device.read_config(0, 4) == 256
    balloon.device.write_config(4, 4, 200)          # the driver's "actual"
    balloon.device.write_config(0, 4, 1)            # num_pages is not the driver's
    assert balloon.device.actual_pages == 200 and balloon.device.target_pages == 256
    with pytest.raises(ValueError):
        balloon.device.set_target(RAM // PAGE_SIZE + 1)
    assert balloon.device.target_pages == 256


def test_features_and_queues_follow_the_spec(memory):
    plain = BalloonDevice(memory, BalloonSpec())
    assert plain.features == 0 and len(plain.queue_sizes) == 2
    full = BalloonDevice(memory, BalloonSpec(deflate_on_oom=True, stats_interval_s=5))
    try:
        assert full.features == VIRTIO_BALLOON_F_DEFLATE_ON_OOM | VIRTIO_BALLOON_F_STATS_VQ
        assert len(full.queue_sizes) == 3
        with pytest.raises(ValueError):
            full.set_stats_interval(0)              # not switched off after creation
        full.set_stats_interval(2)
        assert full.stats_interval_s == 2
    finally:
        full.close()


def stats_buffer(memory, records, at=0x20000):
    data = b"".join(struct.pack("<HQ", tag, value) for tag, value in records)
    memory.write(at, data)
    return (at, len(data), False)


def test_statistics_buffer_is_read_kept_and_returned_each_interval(memory):
    balloon = Balloon(memory, BalloonSpec(stats_interval_s=1))
    device = balloon.device
    try:
        head = balloon.rings[STATS].add_chain([stats_buffer(memory, [(4, 1 << 20), (5, 4 << 20),
                                                                     (0x7777, 9)])])
        device.process_queue(STATS, balloon.queues[STATS])
        assert device.stats.values == {"free_memory": 1 << 20, "total_memory": 4 << 20}
        assert balloon.used(STATS) == []            # kept until the next poll
        deadline = time.monotonic() + 10
        while not balloon.kicks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert balloon.kicks == [STATS]
        device.process_queue(STATS, balloon.queues[STATS])
        assert balloon.used(STATS) == [(head, 0)]   # "send me new statistics"
        balloon.rings[STATS].add_chain([stats_buffer(memory, [(4, 123)])])
        device.process_queue(STATS, balloon.queues[STATS])
        assert device.stats.values["free_memory"] == 123
    finally:
        device.close()


def test_statistics_records_are_bounded(memory):
    balloon = Balloon(memory, BalloonSpec(stats_interval_s=60))
    try:
        records = [(4, i) for i in range(1000)]     # a 10 KB buffer of one tag
        balloon.rings[STATS].add_chain([stats_buffer(memory, records)])
        balloon.device.process_queue(STATS, balloon.queues[STATS])
        assert balloon.device.stats.values == {"free_memory": 31}    # the first 32 read
    finally:
        balloon.device.close()


def test_balloon_through_virtio_pci(memory):
    """The device behind a real virtio-pci transport: negotiation, an inflate through
    the doorbell and the worker thread, and a configuration interrupt for a new target."""
    vm = StandInVm(memory)
    device = BalloonDevice(memory, BalloonSpec(deflate_on_oom=True))
    function = VirtioPciDevice(vm, memory, device)
    device.config_changed = function.config_changed
    driver = PciDriver(function)
    try:
        assert driver.device_features() & VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        driver.negotiate(driver.device_features())
        rings = [DriverRing(memory, RINGS + 0x3000 * i, 256) for i in range(2)]
        for index, ring in enumerate(rings):
            driver.setup_queue(index, ring)
        driver.driver_ok()
        memory.fill(BALLOONED, PAGE_SIZE, 0x33)
        memory.write(PFN_LIST, struct.pack("<I", BALLOONED // PAGE_SIZE))
        rings[INFLATE].add_chain([(PFN_LIST, 4, False)])
        os.eventfd_write(function.queue_fds[INFLATE], 1)
        deadline = time.monotonic() + 10
        while rings[INFLATE].used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert memory.read(BALLOONED, 1) == b"\0"
        generation = function.config_generation
        device.set_target(10)
        assert function.config_generation == (generation + 1) & 0xFF
        assert device.read_config(0, 4) == 10
    finally:
        function.close()
        vm.close()


@needs_kvm
def test_balloon_and_rng_limit_survive_a_snapshot(tmp_path):
    """A machine's balloon (its target as the host last set it, its statistics interval)
    and its virtio-rng's rate limiter are part of what a snapshot restores."""
    from pykvm import layout
    from pykvm.machine import MachineConfig, build_for_boot
    from pykvm.snapshot import restore_machine, save_snapshot

    from ..asm import assemble

    guest = tmp_path / "spin.bin"
    guest.write_bytes(assemble("1: jmp 1b"))
    config = MachineConfig(flat=guest, mem_size=8 << 20, balloon=True,
                           balloon_mib=1, balloon_stats_s=7, rng=True,
                           rng_rate_limit="bandwidth=4096:1000:0")
    with build_for_boot(config, stdout=io.BytesIO()) as machine:
        machine.balloon.set_target(300)
        machine.vm.start()
        save_snapshot(machine, tmp_path / "snap")
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
    with restore_machine(tmp_path / "snap", stdout=io.BytesIO()) as restored:
        assert restored.balloon.target_pages == 300
        assert restored.balloon.stats_interval_s == 7
        assert restored.virtio.rng.rate_limiter.bandwidth.size == 4096
    with pytest.raises(ConfigError, match="balloon target"):
        MachineConfig(flat=guest, mem_size=layout.MIN_MEM_SIZE + 0x10000, balloon=True,
                      balloon_mib=1 << 20).validate()
