"""The benches' C reference queues (bench/c/virtq.h's ring loop, built and run by
bench/cqueue.py): blk.py's virtio-blk device (bench/c/blk_serve.c) and net.py's transmit
queue (bench/c/net_tx_serve.c) serve a split ring correctly and refuse a hostile one:
driven directly over an mmap standing in for guest RAM (no VM), then in the benches'
real VMs. Speed is the
bench's business; nothing here asserts timing."""

import ctypes
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ..conftest import needs_kvm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import cqueue  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the C device needs gcc")

RAM, N = 1 << 20, 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
NEXT, WRITE = 1, 2


class Ring:
    """A driver's view of a split ring (virtio 1.2 2.7) in an mmap, and the C loop
    serving it on a thread."""

    def __init__(self, lib, image: Path, *, event_idx=True, server="blk_serve", backend_fd=None):
        self.ram = mmap.mmap(-1, RAM)
        self.anchor = ctypes.c_char.from_buffer(self.ram)
        self.image_fd = os.open(image, os.O_RDWR) if backend_fd is None else os.dup(backend_fd)
        self.kick, self.call, self.stop = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
        self.counters = cqueue.Counters()
        self.queue = cqueue.Queue(ram=ctypes.addressof(self.anchor), ram_size=RAM, desc=DESC,
                                 avail=AVAIL, used=USED, backend_size=os.path.getsize(image),
                                 poll_ns=0, size=N, event_idx=int(event_idx),
                                 kick_fd=self.kick, call_fd=self.call, stop_fd=self.stop,
                                 backend_fd=self.image_fd)
        self.avail_idx = 0
        self.result = None
        self.thread = threading.Thread(target=self._serve, args=(getattr(lib, server),))
        self.thread.start()

    def _serve(self, server):
        self.result = server(ctypes.byref(self.queue), ctypes.byref(self.counters))

    def descriptor(self, index, addr, length, flags, next_index=0):
        struct.pack_into("<QIHH", self.ram, DESC + 16 * index, addr, length, flags, next_index)

    def offer(self, head):
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % N), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)

    def used(self, count, timeout=10.0):
        """The first ``count`` used entries (id, len), once the device published them."""
        deadline = time.monotonic() + timeout
        while struct.unpack_from("<H", self.ram, USED + 2)[0] < count:
            assert time.monotonic() < deadline, f"used index stayed below {count}"
            assert self.thread.is_alive(), self.counters.why
            time.sleep(0.001)
        return [struct.unpack_from("<II", self.ram, USED + 4 + 8 * i) for i in range(count)]

    def stopped(self):
        """The loop's return value once it stopped (it stops by itself on a broken rule)."""
        os.eventfd_write(self.stop, 1)
        self.thread.join(10)
        assert not self.thread.is_alive()
        return self.result

    def close(self):
        del self.anchor
        self.ram.close()
        for fd in (self.image_fd, self.kick, self.call, self.stop):
            os.close(fd)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return cqueue.build(tmp_path_factory.mktemp("cqueue"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 << 10))
    return path


def request(ring, slot, kind, sector, data_addr, length, *, split_header=False):
    """Slot ``slot``'s request (descriptors 4*slot...): header, data, status."""
    head, header = 4 * slot, 0x10000 + 0x100 * slot
    struct.pack_into("<IIQ", ring.ram, header, kind, 0, sector)
    ring.ram[header + 0x80] = 0xFF                                  # status, not yet written
    index = head
    if split_header:                                                # 5 + 11 header bytes
        ring.descriptor(index, header, 5, NEXT, index + 1)
        ring.descriptor(index + 1, header + 5, 11, NEXT, index + 2)
        index += 2
    else:
        ring.descriptor(index, header, 16, NEXT, index + 1)
        index += 1
    ring.descriptor(index, data_addr, length, NEXT | (WRITE if kind == 0 else 0), index + 1)
    ring.descriptor(index + 1, header + 0x80, 1, WRITE)
    return head, header + 0x80


def test_reads_and_writes_reach_the_image_and_guest_ram(lib, image):
    content = image.read_bytes()
    ring = Ring(lib, image)
    try:
        read_head, read_status = request(ring, 0, 0, 5, 0x20000, 4096)
        ring.ram[0x30000:0x30200] = b"W" * 512
        write_head, write_status = request(ring, 1, 1, 9, 0x30000, 512, split_header=True)
        ring.offer(read_head)
        ring.offer(write_head)
        used = ring.used(2)
        assert sorted(used) == [(read_head, 4097), (write_head, 1)]
        assert ring.ram[read_status] == ring.ram[write_status] == 0
        assert ring.ram[0x20000:0x21000] == content[5 * 512:5 * 512 + 4096]
        assert image.read_bytes()[9 * 512:10 * 512] == b"W" * 512
        assert (ring.counters.reads, ring.counters.writes, ring.counters.errors) == (1, 1, 0)
        assert os.eventfd_read(ring.call) >= 1          # used_event 0 was crossed: signalled
        assert ring.stopped() == 0
    finally:
        ring.close()


def test_a_request_past_the_image_end_is_an_io_error_not_a_failure(lib, image):
    ring = Ring(lib, image)
    try:
        head, status = request(ring, 0, 0, (64 << 10) // 512 - 1, 0x20000, 1024)
        ring.offer(head)
        assert ring.used(1) == [(head, 1)]
        assert ring.ram[status] == 1                    # VIRTIO_BLK_S_IOERR
        unknown, status = request(ring, 1, 99, 0, 0x20000, 512)
        ring.offer(unknown)
        assert ring.used(2)[1] == (unknown, 1)
        assert ring.ram[status] == 2                    # VIRTIO_BLK_S_UNSUPP
        assert ring.stopped() == 0
    finally:
        ring.close()


@pytest.mark.parametrize("rule", ["loop", "outside RAM", "head index", "avail too far"])
def test_a_hostile_ring_stops_the_loop_with_the_rule_it_broke(lib, image, rule):
    ring = Ring(lib, image)
    try:
        head = 0
        if rule == "loop":                                  # 0 -> 1 -> 2 -> 1 -> ...
            ring.descriptor(0, 0x10000, 16, NEXT, 1)
            ring.descriptor(1, 0x20000, 512, NEXT | WRITE, 2)
            ring.descriptor(2, 0x20000, 512, NEXT | WRITE, 1)
            why = "longer than the queue"
        elif rule == "outside RAM":
            ring.descriptor(0, RAM - 8, 16, NEXT, 1)
            why = "outside guest RAM"
        elif rule == "head index":
            head, why = N, "index out of range"
        else:
            ring.avail_idx = N                              # N + 1 ahead after the offer
            why = "more than the queue size ahead"
        ring.offer(head)
        ring.thread.join(10)
        assert not ring.thread.is_alive() and ring.result == -1
        assert why in ring.counters.why.decode()
        assert struct.unpack_from("<H", ring.ram, USED + 2)[0] == 0   # nothing completed
    finally:
        ring.close()


@needs_kvm
@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("as", "ld")),
                    reason="the bench needs GNU as/ld")
def test_the_bench_runs_its_guest_on_the_c_device():
    """Every case, both queue depths: blk.py checks each slot's last buffer against the
    image and the C loop's request count against the guest's, and fails otherwise."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "blk.py"), "--backend", "c",
                           "--quick"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("rand read 4 KiB   32") for line in lines), done.stdout
    assert float(lines[-1].split()[1]) > 0


def test_net_transmit_writes_each_chain_whole_and_drops_malformed_ones(lib, image):
    """One writev per chain, virtio-net header included (the TAP's IFF_VNET_HDR), used
    with length 0; a chain shorter than the header or with a device-writable buffer is
    given back unsent and counted."""
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ring = Ring(lib, image, server="net_tx_serve", backend_fd=sender.fileno())
    try:
        header, frame = bytes(12), bytes(range(64)) * 2
        ring.ram[0x20000:0x20000 + 12] = header
        ring.ram[0x20100:0x20100 + len(frame)] = frame
        ring.descriptor(0, 0x20000, 12, NEXT, 1)                # header, then the frame
        ring.descriptor(1, 0x20100, len(frame), 0)
        ring.descriptor(2, 0x20000, 5, 0)                       # shorter than a header
        ring.descriptor(3, 0x20000, 12, NEXT, 4)
        ring.descriptor(4, 0x20100, 64, WRITE)                  # device-writable: not a frame
        for head in (0, 2, 3):
            ring.offer(head)
        assert ring.used(3) == [(0, 0), (2, 0), (3, 0)]
        receiver.settimeout(5)
        assert receiver.recv(4096) == header + frame
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(4096)                                 # nothing else was sent
        assert (ring.counters.writes, ring.counters.errors) == (1, 2)
        assert ring.stopped() == 0
    finally:
        ring.close()
        receiver.close()
        sender.close()


@needs_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="the net bench needs root (TAP, netns)")
@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("as", "ld")),
                    reason="the bench needs GNU as/ld")
def test_the_net_bench_transmits_through_the_c_queue():
    """net.py checks that the frame reaching the TAP's host side is the guest's and stops
    if the C loop broke off; the C floor table then has a row."""
    pytest.importorskip("pyroute2")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "net.py"), "--quick", "--c-tx",
                           "--no-passt", "--sizes", "1500"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    floor = lines.index(next(line for line in lines if line.startswith("C floor")))
    row = lines[floor + 2].split()
    assert row[0] == "1500B" and float(row[3].replace(",", "")) > 0, done.stdout
