"""virtio-blk with an in-memory guest RAM and real image files (no KVM needed):
requests, read-only disks, locking, bad images, --disk parsing, and the whole
transport path (worker thread, MSI-X, NEEDS_RESET on garbage, reset)."""

import os
import struct
import subprocess
import sys
import time

import pytest

from pykvm.devices.pci.msix import CONTROL_ENABLE
from pykvm.devices.virtio.attach import DiskSpec
from pykvm.devices.virtio.blk import (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR,
                                      VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
                                      VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                      BlockDevice)
from pykvm.devices.virtio.device import STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.queue import Virtqueue, VirtqueueError
from pykvm.errors import ConfigError, ImageError
from pykvm.memory import GuestMemory

from ..fakes import wait_for
from ..logs import pykvm_warnings

RING, HEADER, DATA, STATUS = 0x1000, 0x8000, 0x10000, 0x9000
SECTORS = 64


@pytest.fixture
def memory():
    with GuestMemory.anonymous(2 << 20) as ram:
        yield ram


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 2 * SECTORS)
    return path


def offer_request(memory, ring, kind, sector=0, data_len=0, out_data=b"", status_addr=STATUS):
    """Put a block request on ``ring`` as a driver does: the header at HEADER, data
    to write (``out_data``) or room for ``data_len`` bytes to read at DATA, then the
    status byte (0xEE until the device writes it)."""
    memory.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    buffers = [(HEADER, 16, False)]
    if out_data:
        memory.write(DATA, out_data)
        buffers.append((DATA, len(out_data), False))
    if data_len:
        buffers.append((DATA, data_len, True))
    buffers.append((status_addr, 1, True))
    memory.write_u8(status_addr, 0xEE)
    ring.add_chain(buffers)


class Blk:
    """A BlockDevice with one ring, driven synchronously."""

    def __init__(self, memory, path, **options):
        self.memory = memory
        self.device = BlockDevice(str(path), **options)
        self.ring = DriverRing(memory, RING, 16)
        self.queue = Virtqueue(memory, 16)
        self.queue.desc_addr, self.queue.avail_addr, self.queue.used_addr = \
            self.ring.desc_addr, self.ring.avail_addr, self.ring.used_addr
        self.queue.activate(indirect=True, event_idx=False)

    def request(self, kind, sector=0, data_len=0, out_data=b"", status_addr=STATUS):
        offer_request(self.memory, self.ring, kind, sector, data_len, out_data, status_addr)
        self.device.process_queue(0, self.queue)
        (_, written), = self.ring.take_used()
        return self.memory.read_u8(status_addr), written

    def close(self):
        self.device.close()


def test_read_sectors_into_guest_memory(memory, image):
    blk = Blk(memory, image)
    status, written = blk.request(VIRTIO_BLK_T_IN, sector=3, data_len=1024)
    assert (status, written) == (VIRTIO_BLK_S_OK, 1025)
    assert memory.read(DATA, 1024) == image.read_bytes()[3 * 512:5 * 512]
    blk.close()


def test_write_then_flush_reaches_the_file(memory, image):
    blk = Blk(memory, image)
    payload = b"pykvm!" * 170 + b"1234"   # 1024 bytes
    assert blk.request(VIRTIO_BLK_T_OUT, sector=10, out_data=payload) == (VIRTIO_BLK_S_OK, 1)
    assert blk.request(VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, 1)
    assert image.read_bytes()[10 * 512:12 * 512] == payload
    assert blk.device.requests["flush"] == 1
    blk.close()


def test_a_request_split_over_many_descriptors(memory, image):
    blk = Blk(memory, image)
    # header split in two, data in three pieces of odd sizes, status alone
    memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1))
    blk.ring.add_chain([(HEADER, 5, False), (HEADER + 5, 11, False), (DATA, 100, True),
                        (DATA + 0x1000, 300, True), (DATA + 0x2000, 112, True), (STATUS, 1, True)])
    blk.device.process_queue(0, blk.queue)
    assert blk.ring.take_used()[0][1] == 513
    expected = image.read_bytes()[512:1024]
    got = memory.read(DATA, 100) + memory.read(DATA + 0x1000, 300) + memory.read(DATA + 0x2000, 112)
    assert got == expected and memory.read_u8(STATUS) == VIRTIO_BLK_S_OK
    blk.close()


@pytest.mark.parametrize("sector, length", [(3, 1024), (0, 512), (SECTORS - 1, 512),
                                            (SECTORS - 1, 1024), (SECTORS, 512), (1 << 60, 512),
                                            (0, 100), (0, 0)])
def test_linux_read_layout_and_any_other_layout_give_the_same_answer(memory, image, sector,
                                                                     length):
    """Reads in Linux's layout (header | data | status, one buffer each) take handle's
    fast path; the same read with its header split over two descriptors takes the
    general one. Status byte, bytes written, data and the request counters agree."""
    answers = []
    for split in (False, True):
        blk = Blk(memory, image)
        memory.fill(DATA, 1024, 0xAA)
        memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector))
        memory.write_u8(STATUS, 0xEE)
        header = [(HEADER, 7, False), (HEADER + 7, 9, False)] if split else [(HEADER, 16, False)]
        blk.ring.add_chain(header + ([(DATA, length, True)] if length else []) +
                           [(STATUS, 1, True)])
        blk.device.process_queue(0, blk.queue)
        (_, written), = blk.ring.take_used()
        answers.append((memory.read_u8(STATUS), written, memory.read(DATA, 1024),
                        dict(blk.device.requests)))
        blk.close()
    assert answers[0] == answers[1]
    assert answers[0][0] == (VIRTIO_BLK_S_OK if length % 512 == 0
                             and sector + length // 512 <= SECTORS else VIRTIO_BLK_S_IOERR)


def test_get_id_returns_the_serial(memory, image):
    blk = Blk(memory, image, serial="disk-0042")
    assert blk.request(VIRTIO_BLK_T_GET_ID, data_len=20) == (VIRTIO_BLK_S_OK, 21)
    assert memory.read(DATA, 20) == b"disk-0042".ljust(20, b"\0")
    blk.close()


@pytest.mark.parametrize("sector, length", [(SECTORS - 1, 1024), (SECTORS, 512), (1 << 60, 512),
                                            (0, 100)])
def test_out_of_range_or_partial_sector_requests_are_io_errors(memory, image, sector, length):
    blk = Blk(memory, image)
    before = image.read_bytes()
    assert blk.request(VIRTIO_BLK_T_IN, sector=sector, data_len=length)[0] == VIRTIO_BLK_S_IOERR
    assert blk.request(VIRTIO_BLK_T_OUT, sector=sector, out_data=b"x" * length)[0] == \
        VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before and os.path.getsize(image) == SECTORS * 512
    blk.close()


def test_unknown_request_type_is_unsupported(memory, image):
    blk = Blk(memory, image)
    assert blk.request(99)[0] == VIRTIO_BLK_S_UNSUPP
    blk.close()


def test_read_only_disk_refuses_writes_and_says_so(memory, image):
    blk = Blk(memory, image, read_only=True)
    before = image.read_bytes()
    assert blk.device.features & VIRTIO_BLK_F_RO
    assert blk.request(VIRTIO_BLK_T_OUT, sector=0, out_data=b"z" * 512) == (VIRTIO_BLK_S_IOERR, 1)
    assert blk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
    assert blk.request(VIRTIO_BLK_T_IN, data_len=512)[0] == VIRTIO_BLK_S_OK
    assert image.read_bytes() == before
    blk.close()


def test_requests_without_status_or_header_are_virtqueue_errors(memory, image):
    blk = Blk(memory, image)
    blk.ring.add_chain([(HEADER, 16, False)])
    with pytest.raises(VirtqueueError, match="status"):
        blk.device.process_queue(0, blk.queue)
    blk.ring.add_chain([(HEADER, 8, False), (STATUS, 1, True)])
    with pytest.raises(VirtqueueError, match="header"):
        blk.device.process_queue(0, blk.queue)
    blk.close()


def test_config_space_capacity_and_features(image):
    device = BlockDevice(str(image))
    assert device.read_config(0, 8) == SECTORS
    assert device.read_config(12, 4) == 254        # seg_max
    assert device.read_config(20, 4) == 512        # blk_size
    assert device.features & VIRTIO_BLK_F_FLUSH and not device.features & VIRTIO_BLK_F_RO
    device.close()


# --- images: locking and validation ---------------------------------------------------------
def test_second_writer_gets_a_clear_lock_error(image):
    first = BlockDevice(str(image))
    with pytest.raises(ImageError, match="locked by another process"):
        BlockDevice(str(image))
    with pytest.raises(ImageError, match="locked"):
        BlockDevice(str(image), read_only=True)
    first.close()
    BlockDevice(str(image)).close()      # the lock went with the fd


def test_readers_share_but_exclude_a_writer(image):
    readers = [BlockDevice(str(image), read_only=True) for _ in range(2)]
    with pytest.raises(ImageError, match="locked"):
        BlockDevice(str(image))
    for reader in readers:
        reader.close()


def test_lock_held_by_another_process(image):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pykvm.devices.virtio.blk import BlockDevice; "
        f"d = BlockDevice({str(image)!r}); print('locked', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ImageError, match="locked by another process"):
            BlockDevice(str(image))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("content, match", [(b"x" * 1000, "not a multiple of 512"),
                                            (b"", "empty")])
def test_bad_images(tmp_path, content, match):
    path = tmp_path / "bad.img"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=match):
        BlockDevice(str(path))


def test_missing_image_and_directory(tmp_path):
    with pytest.raises(ImageError, match="no such disk image"):
        BlockDevice(str(tmp_path / "nope.img"))
    with pytest.raises(ImageError, match="directory"):
        BlockDevice(str(tmp_path))


@pytest.mark.parametrize("text, expected", [
    ("a.img", DiskSpec("a.img")), ("/x/b.img,ro", DiskSpec("/x/b.img", True)),
    ("c.img,serial=abc-1,ro", DiskSpec("c.img", True, "abc-1"))])
def test_disk_spec_parse(text, expected):
    assert DiskSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["", ",ro", "a.img,rw,bogus", "a.img,serial=", "a.img,serial=" + "x" * 21,
                                  "a.img,serial=has space"])
def test_disk_spec_errors(text):
    with pytest.raises(ConfigError):
        DiskSpec.parse(text)


# --- the whole transport: worker thread, interrupts, NEEDS_RESET ------------------------------


@pytest.fixture
def blk_function(memory, image):
    vm = StandInVm(memory)
    lines = [RecordingLine(24 + i) for i in range(2)]
    function = VirtioPciDevice(vm, memory, BlockDevice(str(image)), interrupt_lines=lines)
    yield function, lines, vm
    function.close()
    vm.close()


def bring_up(function, memory, msix=True):
    driver = PciDriver(function)
    assert driver.negotiate(VIRTIO_F_VERSION_1) & 8
    if msix:
        config = function.config
        config.write(function.msix.offset + 2, 2, CONTROL_ENABLE)
        for vector in range(2):
            function.msix.write(16 * vector + 12, 4, 0)
    ring = DriverRing(memory, RING, 16)
    driver.setup_queue(0, ring, vector=0)
    driver.write(0x10, 2, 1)     # config changes on vector 1
    driver.driver_ok()
    return driver, ring


def test_requests_flow_through_the_worker_with_msix(blk_function, memory, image):
    function, lines, _ = blk_function
    driver, ring = bring_up(function, memory)
    memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2))
    ring.add_chain([(HEADER, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    driver.notify(0)
    assert wait_for(lambda: ring.used_idx() == 1)
    assert memory.read(DATA, 512) == image.read_bytes()[1024:1536]
    assert wait_for(lambda: lines[0].triggered == 1)
    assert function.worker.thread.name == "virtio-blk-io"


def test_intx_fallback_sets_isr_and_clears_on_read(blk_function, memory):
    function, lines, _ = blk_function
    intx = RecordingLine(10)
    function.intx = intx
    driver, ring = bring_up(function, memory, msix=False)
    memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0))
    ring.add_chain([(HEADER, 16, False), (STATUS, 1, True)])
    driver.notify(0)
    assert wait_for(lambda: intx.level)
    assert driver.read(0x1000, 1) == 1 and not intx.level
    assert driver.read(0x1000, 1) == 0
    assert lines[0].triggered == 0


def test_garbage_makes_the_device_need_reset_and_reset_recovers(blk_function, memory, caplog):
    function, lines, vm = blk_function
    driver, ring = bring_up(function, memory)
    ring.add_chain([(1 << 40, 16, False), (STATUS, 1, True)])
    driver.notify(0)
    assert wait_for(lambda: driver.status() & STATUS_NEEDS_RESET)
    assert wait_for(lambda: lines[1].triggered == 1)       # config-change interrupt
    assert any("device needs reset" in line for line in pykvm_warnings(caplog))
    ring.add_chain([(1 << 40, 16, False), (STATUS, 1, True)])
    driver.notify(0)
    time.sleep(0.05)
    assert sum("needs reset" in line for line in pykvm_warnings(caplog)) == 1   # logged once
    driver.write(0x14, 1, 0)                                # reset
    assert driver.status() == 0
    driver, ring = bring_up(function, memory)
    memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_GET_ID, 0, 0))
    ring.add_chain([(HEADER, 16, False), (DATA, 20, True), (STATUS, 1, True)])
    driver.notify(0)
    assert wait_for(lambda: ring.used_idx() == 1)
    assert memory.read_u8(STATUS) == VIRTIO_BLK_S_OK


def test_notify_through_the_ioeventfd_address(memory, image):
    from pykvm.devices.pci.bus import PciBus

    vm = StandInVm(memory)
    bus = PciBus(vm)
    lines = [RecordingLine(24 + i) for i in range(2)]
    function = VirtioPciDevice(vm, memory, BlockDevice(str(image)), interrupt_lines=lines)
    slot = bus.add(function)
    base = bus.bar_address(slot, 0)
    assert vm.ioeventfds == {(base + 0x3000, 2): function.queue_fds[0]}
    driver, ring = bring_up(function, memory)
    memory.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    ring.add_chain([(HEADER, 16, False), (DATA, 512, True), (STATUS, 1, True)])
    vm.mmio_write(base + 0x3000, 2, 0)      # what KVM does for a matched write
    assert wait_for(lambda: ring.used_idx() == 1)
    vm.close()
    assert vm.ioeventfds == {}
