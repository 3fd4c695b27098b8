#!/usr/bin/env python3
"""virtio-blk's data path against plain preadv() into the same memory.

pykvm side: a VirtioPciDevice with a BlockDevice over a temporary raw image, in
guest RAM (GuestMemory) but without a guest: a Python driver
(pykvm.devices.virtio.driver) puts ``depth`` read requests (header, data
buffer, status byte) on the ring, signals the queue's eventfd exactly as KVM
does for a matched ioeventfd write, and waits for the MSI-X "interrupt" (the
vector's line). The device's I/O thread pops each chain, validates it, and
preadv()s straight into the guest buffers. The clock runs from each doorbell to
the batch's last completion, so it times everything pykvm does per request
(eventfd wake-up, ring parsing and checks, preadv, used ring, interrupt), but
neither the driver's ring writes nor the ioeventfd exit, which KVM finishes in
the kernel.

Reference: the same number of preadv() calls of the same size into the same
buffers, in one thread: the cost with nothing in the way. Both read the image
from the page cache (it is read once before timing).

    python3 bench/blk.py             # 5 rounds x 4096 requests of 4 KiB, queue depth 32
    python3 bench/blk.py --size 65536
    python3 bench/blk.py --quick     # does it work?

Last line: ``ratio: X`` = median pykvm time / median reference time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm.devices.pci.msix import CONTROL_ENABLE  # noqa: E402
from pykvm.devices.virtio.blk import VIRTIO_BLK_T_IN, BlockDevice  # noqa: E402
from pykvm.devices.virtio.device import VIRTIO_F_VERSION_1  # noqa: E402
from pykvm.devices.virtio.driver import DriverRing, PciDriver, StandInVm  # noqa: E402
from pykvm.devices.virtio.pci import VirtioPciDevice  # noqa: E402
from pykvm.memory import GuestMemory  # noqa: E402

RING, HEADERS, STATUS, DATA = 0x1000, 0x10000, 0x20000, 0x100000
IMAGE_SIZE = 64 << 20


class EventLine:
    """An MSI-X vector's line that wakes the waiting driver."""

    def __init__(self, gsi):
        self.gsi, self.event = gsi, threading.Event()

    def trigger(self):
        self.event.set()

    def close(self):
        pass


def pykvm_round(memory, function, ring, line, count, depth, size):
    """Seconds from each batch's doorbell to its last completion, summed (the driver's
    own ring writes happen before the doorbell and are not counted)."""
    sectors = IMAGE_SIZE // 512
    elapsed = 0.0
    done = 0
    while done < count:
        batch = min(depth, count - done)
        for i in range(batch):
            sector = ((done + i) * (size // 512)) % (sectors - size // 512)
            memory.write(HEADERS + 16 * i, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector))
            ring.add_chain([(HEADERS + 16 * i, 16, False), (DATA + i * size, size, True),
                            (STATUS + i, 1, True)])
        line.event.clear()
        started = time.perf_counter()
        os.eventfd_write(function.queue_fds[0], 1)       # what KVM does on the doorbell
        while ring.used_idx() != ring.avail_idx:
            line.event.wait(1.0)
            line.event.clear()
        elapsed += time.perf_counter() - started
        ring.take_used()
        done += batch
    return elapsed


def reference_round(memory, fd, count, depth, size):
    sectors = IMAGE_SIZE // 512
    views = [memory.view(DATA + i * size, size) for i in range(depth)]
    started = time.perf_counter()
    for n in range(count):
        sector = (n * (size // 512)) % (sectors - size // 512)
        os.preadv(fd, [views[n % depth]], sector * 512)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="bytes per request (default 4096)")
    parser.add_argument("--count", type=int, default=4096, help="requests per round")
    parser.add_argument("--depth", type=int, default=32, help="requests per notify (queue depth)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="200 requests, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.count, args.rounds = 200, 1
    if args.size % 512 or args.depth * 3 > 256 or DATA + args.depth * args.size > 256 << 20:
        parser.error("--size must be a multiple of 512 and depth*3 <= 256")

    with tempfile.TemporaryDirectory() as scratch, GuestMemory.anonymous(256 << 20) as memory:
        image = Path(scratch) / "bench.img"
        image.write_bytes(os.urandom(1 << 20) * (IMAGE_SIZE >> 20))
        vm = StandInVm(memory)
        lines = [EventLine(24), EventLine(25)]
        function = VirtioPciDevice(vm, memory, BlockDevice(str(image)), interrupt_lines=lines)
        driver = PciDriver(function)
        driver.negotiate(VIRTIO_F_VERSION_1)
        function.config.write(function.msix.offset + 2, 2, CONTROL_ENABLE)
        function.msix.write(12, 4, 0)
        ring = DriverRing(memory, RING, 256)
        driver.setup_queue(0, ring, vector=0)
        driver.driver_ok()
        fd = os.open(image, os.O_RDONLY)
        try:
            reference_round(memory, fd, IMAGE_SIZE // args.size, 1, args.size)  # warm the cache
            pykvm_round(memory, function, ring, lines[0], args.depth, args.depth, args.size)
            pykvm_times, reference_times = [], []
            for _ in range(args.rounds):
                reference_times.append(reference_round(memory, fd, args.count, args.depth, args.size))
                pykvm_times.append(pykvm_round(memory, function, ring, lines[0], args.count,
                                               args.depth, args.size))
        finally:
            os.close(fd)
            function.close()
            vm.close()

    def row(name, times):
        per = [t / args.count * 1e6 for t in times]
        mbps = args.count * args.size / statistics.median(times) / 1e6
        return (f"{name:<28} {statistics.median(per):9.2f} {min(per):9.2f} {max(per):9.2f} "
                f"{mbps:10.1f}")

    print(f"virtio-blk reads: {args.count} requests of {args.size} bytes, depth {args.depth}, "
          f"{args.rounds} round(s)")
    print(f"{'':<28} {'µs/req':>9} {'min':>9} {'max':>9} {'MB/s':>10}")
    print(row("reference (preadv)", reference_times))
    print(row("pykvm (virtio-blk path)", pykvm_times))
    overhead = (statistics.median(pykvm_times) - statistics.median(reference_times)) / args.count
    print(f"pykvm overhead per request: {overhead * 1e6:.2f} µs")
    print(f"ratio: {statistics.median(pykvm_times) / statistics.median(reference_times):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
