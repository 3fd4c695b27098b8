#!/usr/bin/env python3
"""virtio-blk driven by a guest at native speed, against the host's own
preadv/pwritev on the same file: MB/s and IOPS for 1 MiB sequential reads and
writes and 4 KiB random reads, at queue depth 1 and 32.

pykvm side: a real VM whose guest (bench/guests/blk_loop.S, assembled at run
time) drops to ring 3 -- native speed on every host, kvm_pvm included, where a
Linux guest's block layer (ring 0) would be emulated and measure kvm_pvm, not
pykvm -- and owns the one queue of a real BlockDevice on a real VirtioPciDevice
over a temporary raw image. The bench plays the driver's probe from the host
(features with EVENT_IDX, the ring, DRIVER_OK) and, per case, writes the request
slots' descriptors (header, data buffer, status byte); the guest then keeps
``depth`` requests in flight: for each completion it finds by polling the used
index (or, with nothing completed yet, after waiting for the device's interrupt
in one exit, as net.py's guest does; --spin: it spins) it checks the status byte, writes the slot's next sector into its header,
puts it back on the avail ring and rings the doorbell (an MMIO write matched by
an ioeventfd: no exit) when the device asked for one (EVENT_IDX). Nothing of the
data path passes through a vCPU exit; the device's I/O thread preadv()s and
pwritev()s straight between the image and guest RAM.

Reference (the limit): this process, one thread, preadv()/pwritev() of the same
sizes with the same pattern (sequential from offset 0, wrapping; random 4 KiB
blocks from the same xorshift64 sequence) on the same file into buffers in the
same guest RAM, cycling through as many buffers as the guest has requests in
flight (queue depth means nothing to a synchronous call, but the buffers' memory
footprint does: one 1 MiB buffer stays in the CPU's caches, 32 do not). It is
what one host thread gets with nothing in the way; each pykvm case runs right
after its reference, so host noise hits both. Page cache: the image is read whole before each case (both sides), so
every read is served from the page cache and every write dirties cached pages
(no O_DIRECT, no fsync): both sides measure the same memory-speed path. The
image is on /dev/shm (tmpfs) by default: on a disk's file system the kernel's
writeback throttling stalls writers at random moments, which made the write
figures of either side jump by up to 8x between runs.

Counts are sampled over ``--seconds`` after a warm-up (time-based, like
bench/net.py); after each pykvm case the bench checks the data of every slot's
last request against the file, and the device's own request count against the
guest's.

    python3 bench/blk.py             # 1 s per case
    python3 bench/blk.py --quick     # 0.2 s per case: does it work?
    python3 bench/blk.py --spin      # the guest spins on the used index instead of waiting
    python3 bench/blk.py --spin --msix   # ... its queue on an MSI-X vector (KVM irqfd), not INTx
    python3 bench/blk.py --transport mmio   # pykvm's device on virtio-mmio (rows say so)
    python3 bench/blk.py --backend pykvm+c  # pykvm's device, then the C reference (blk_c.py)
    python3 bench/blk.py --record    # also add rows to bench/RESULTS.md

Needs /dev/kvm and GNU as/ld. Last line: ``ratio: X`` = pykvm MB/s / host MB/s
for 1 MiB sequential reads at queue depth 32.
"""

from __future__ import annotations

import argparse
import datetime
import os
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (ROOT, BENCH):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from flatguest import (WAIT_PORT, BenchError, Waiter, assemble, cpu_seconds,  # noqa: E402
                       run_queue_seconds)
from results import add_rows  # noqa: E402

from pykvm.devices.virtio.blk import BlockDevice  # noqa: E402
from pykvm.devices.virtio.poll import configure  # noqa: E402

from tests.command_register import CommandRegister  # noqa: E402

GUEST_SOURCE = BENCH / "guests" / "blk_loop.S"
RESULTS = BENCH / "RESULTS.md"

MEM_SIZE = 64 << 20
LOAD_ADDR = 0x10000
PARAMS = 8                              # offset of the guest's parameter block
QUEUE = 256
RING = 0x100000
HEADERS, STATUSES = 0x110000, 0x111000
DATA = 0x200000                         # slot i's data buffer at DATA + i * size
MAX_DEPTH = 32
BAR_ADDR = 0xC0000000                   # where the bench "maps" the device's BAR
CMD_ADDR = 0xD0001000                   # the command register (tests/command_register.py)
SEED = 0x9E3779B97F4A7C15

# The parameter block of blk_loop.S, u64 each, by name -> index.
P = {name: i for i, name in enumerate(
    "queue_size avail_ring used_ring notify_addr notify_value wait_port cmd_addr headers "
    "statuses depth pattern spr limit stop completed errors notifies waits glitches rng "
    "next_sector cases guest_poll".split())}


@dataclass(frozen=True)
class Case:
    label: str
    write: bool
    size: int
    random: bool


CASES = (Case("seq read 1 MiB", False, 1 << 20, False),
         Case("seq write 1 MiB", True, 1 << 20, False),
         Case("rand read 4 KiB", False, 4096, True))
DEPTHS = (1, 32)


@dataclass
class Rate:
    ops_per_s: float
    size: int
    cpu: float = 0.0                    # CPU s/s of the measured path (pykvm: the device thread)
    vcpu: float = 0.0                   # pykvm: CPU s/s of the vCPU thread
    note: str = ""

    @property
    def mb_per_s(self) -> float:
        return self.ops_per_s * self.size / 1e6


def xorshift(state: int):
    """The guest's random sequence (blk_loop.S `offer`)."""
    mask = (1 << 64) - 1
    while True:
        state ^= (state << 13) & mask
        state ^= state >> 7
        state ^= (state << 17) & mask
        yield state


def block_offsets(case: Case, image_size: int, count: int = 1 << 16) -> list[int]:
    """Byte offsets of the case's first ``count`` requests, as the guest makes them."""
    if not case.random:
        per = image_size // case.size
        return [(i % per) * case.size for i in range(min(count, per))]
    blocks = image_size // case.size
    numbers = xorshift(SEED)
    return [(next(numbers) & (blocks - 1)) * case.size for _ in range(count)]


def warm_cache(path: Path) -> None:
    """Read the image whole: everything both sides touch is then in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(1 << 20)
        while f.readinto(buffer):
            pass


def timed_loop(step, warmup: float, seconds: float) -> tuple[int, float, float]:
    """Run ``step(n)`` (n = operations so far) for ``warmup`` + ``seconds``; returns the
    operations, wall seconds and CPU seconds (this thread) of the measured span."""
    clock = time.perf_counter
    n = 0
    end = clock() + warmup
    while clock() < end:
        for _ in range(16):
            step(n)
            n += 1
    first, started, cpu0 = n, clock(), time.thread_time()
    end = started + seconds
    while clock() < end:
        for _ in range(16):
            step(n)
            n += 1
    return n - first, clock() - started, time.thread_time() - cpu0


def host_rate(memory, path: Path, case: Case, depth: int, image_size: int, warmup: float,
              seconds: float) -> Rate:
    """One thread, synchronous calls; the buffers cycle through ``depth`` slots like the
    guest's (the same memory footprint: 1 MiB stays in the CPU's caches, 32 MiB does not)."""
    offsets = block_offsets(case, image_size)
    count = len(offsets)
    views = [memory.view(DATA + i * case.size, case.size) for i in range(depth)]
    iovs = [[v] for v in views]
    fd = os.open(path, os.O_RDWR)
    try:
        call = os.pwritev if case.write else os.preadv
        size = case.size

        def step(n):
            if call(fd, iovs[n % depth], offsets[n % count]) != size:
                raise BenchError("host reference: a short transfer")

        warm_cache(path)
        ops, wall, cpu = timed_loop(step, warmup, seconds)
    finally:
        os.close(fd)
    return Rate(ops / wall, case.size, cpu / wall)


# --- the pykvm side -------------------------------------------------------------------------
class GuestDisk:
    """A VM with one virtio-blk function over ``device`` (pykvm's own BlockDevice, a
    VhostBlkDevice whose queue qemu-storage-daemon serves, or blk_c.py's CBlockDevice,
    whose queue a C loop serves), its queue set up as a driver would, and the ring-3
    guest waiting for cases. The VM owns ``device``."""

    def __init__(self, kvm, guest: bytes, device, wait: bool, transport: str = "pci",
                 msix: bool = False):
        from pykvm.boot.modes import set_mode
        from pykvm.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
        from pykvm.devices.virtio.driver import DriverRing
        from pykvm.memory import GuestMemory
        from pykvm.vstate.vm import Vm

        self.memory = GuestMemory.anonymous(MEM_SIZE)
        self.vm = Vm(kvm, self.memory)
        self.device = device
        self.msix = msix
        self.c_device = hasattr(device, "attach")   # blk_c.CBlockDevice
        driver, notify_addr = (self._mmio if transport == "mmio" else self._pci)()
        self.vm.on_close(self.function.close)
        self.vm.add_pio_device(WAIT_PORT, 4, self.waiter)
        self.commands = CommandRegister("bench-cmd")  # posted 1: run the case
        self.vm.add_mmio_device(CMD_ADDR, 0x1000, self.commands)
        if not driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX) & 8:
            raise BenchError("the device refused the bench's features")
        self.ring = DriverRing(self.memory, RING, QUEUE)
        if msix:
            driver.setup_queue(0, self.ring, vector=0)
        else:
            driver.setup_queue(0, self.ring)
        driver.driver_ok()
        if self.c_device:                   # the C loop takes the queue and its doorbell over
            from pykvm.devices.virtio.pci import NOTIFY_OFFSET
            device.attach(self.function, self.memory, BAR_ADDR, NOTIFY_OFFSET,
                          self.function.msix.direct_fd(0) if msix else None)
        image_bytes = bytearray(guest)
        self.params = LOAD_ADDR + PARAMS
        self.memory.write(LOAD_ADDR, bytes(image_bytes))
        for name, value in (("queue_size", QUEUE), ("avail_ring", self.ring.avail_addr),
                            ("used_ring", self.ring.used_addr),
                            ("notify_addr", notify_addr), ("notify_value", 0),
                            ("wait_port", WAIT_PORT if wait else 0), ("cmd_addr", CMD_ADDR),
                            ("headers", HEADERS), ("statuses", STATUSES)):
            self.set(name, value)
        self.vm.create_vcpus(1)
        set_mode(self.vm.vcpus[0], self.memory, "long", LOAD_ADDR)
        self.vm.start()

    def _pci(self):
        """A virtio-pci function whose BAR the bench "maps" at BAR_ADDR, interrupting on
        INTx (the waiter); its doorbell the 16-bit write Linux's virtio_pci makes."""
        from pykvm.devices.virtio.driver import PciDriver
        from pykvm.devices.virtio.pci import NOTIFY_OFFSET, VirtioPciDevice

        self.function = VirtioPciDevice(self.vm, self.memory, self.device)
        self.function.bar_mapped(0, BAR_ADDR)       # doorbells become ioeventfds in KVM
        # The C device signals its waiter's eventfd itself; pykvm's raises INTx.
        self.waiter = self.device.waiter if self.c_device else Waiter(self.function)
        self.function.intx = self.waiter
        if self.msix:
            self._enable_msix()
        return PciDriver(self.function), BAR_ADDR + NOTIFY_OFFSET

    def _enable_msix(self) -> None:
        """--msix: the queue interrupts on MSI-X vector 0 (fixed, to APIC 0, vector
        0x40), the KVM irqfd path a Linux driver uses: a vhost-user back end then
        signals KVM directly. The spinning ring-3 guest never takes the interrupt
        (interrupts stay off), so this measures what delivery costs the host."""
        from pykvm.devices.pci.msix import CONTROL_ENABLE
        msix = self.function.msix
        self.function.config.write(msix.offset + 2, 2, CONTROL_ENABLE)
        for offset, value in ((0, 0xFEE00000), (4, 0), (8, 0x40), (12, 0)):
            msix.write(offset, 4, value)

    def _mmio(self):
        """A virtio-mmio device at BAR_ADDR, its edge line the waiter. blk_loop.S rings
        with a 16-bit store; Linux's virtio_mmio with a 32-bit one, which the transport's
        own ioeventfd matches: a second one of 16 bits on the same register, same
        eventfd, puts the bench's doorbell on the same in-kernel path."""
        from pykvm.devices.virtio.driver import MmioDriver
        from pykvm.devices.virtio.mmio import QUEUE_NOTIFY, VirtioMmioDevice

        acknowledge = lambda: MmioDriver(self.function).acknowledge()  # noqa: E731
        self.waiter = Waiter(None, acknowledge)
        self.function = VirtioMmioDevice(self.vm, self.memory, self.device, base=BAR_ADDR,
                                         gsi=0, irq=self.waiter)
        self.vm.add_ioeventfd(BAR_ADDR + QUEUE_NOTIFY, 2, self.function.queue_fds[0],
                              datamatch=0)
        return MmioDriver(self.function), BAR_ADDR + QUEUE_NOTIFY

    def get(self, name: str) -> int:
        return self.memory.read_u64(self.params + 8 * P[name])

    def set(self, name: str, value: int) -> None:
        self.memory.write(self.params + 8 * P[name], struct.pack("<Q", value))

    def prepare(self, case: Case, depth: int, image_size: int) -> None:
        """Slot i: descriptors 4i (header), 4i+1 (data), 4i+2 (status): the guest is
        waiting for a command and nothing is in flight, so the ring is ours."""
        from pykvm.devices.virtio.blk import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
        from pykvm.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE

        for i in range(depth):
            head = 4 * i
            self.ring.write_descriptor(head, HEADERS + 16 * i, 16, DESC_F_NEXT, head + 1)
            self.ring.write_descriptor(head + 1, DATA + i * case.size, case.size,
                                       DESC_F_NEXT | (0 if case.write else DESC_F_WRITE), head + 2)
            self.ring.write_descriptor(head + 2, STATUSES + i, 1, DESC_F_WRITE)
            self.memory.write(HEADERS + 16 * i, struct.pack(
                "<IIQ", VIRTIO_BLK_T_OUT if case.write else VIRTIO_BLK_T_IN, 0, 0))
            if case.write:                  # data the file does not hold yet
                mark = f"pykvm bench slot {i} {time.monotonic_ns()} ".encode()
                self.memory.write(DATA + i * case.size,
                                  (mark * (case.size // len(mark) + 1))[:case.size])
        self.memory.write(STATUSES, b"\xff" * MAX_DEPTH)
        spr = case.size // 512
        self.set("depth", depth)
        self.set("pattern", int(case.random))
        self.set("spr", spr)
        self.set("limit", image_size // case.size - 1 if case.random else image_size // 512)
        self.set("rng", SEED)
        self.set("next_sector", 0)
        self.set("stop", 0)

    def run(self, case: Case, depth: int, image: Path, image_size: int, warmup: float,
            seconds: float, check: bool = True) -> Rate:
        """Run ``case``; ``check``: compare each slot's last request with the (raw) image."""
        self.prepare(case, depth, image_size)
        warm_cache(image)
        cases = self.get("cases")
        vcpu = self.vm.vcpus[0].thread.native_id
        kind = "write" if case.write else "read"
        requests = getattr(self.device, "requests", None)   # pykvm's own device counts
        device0, errors0, completed0 = requests[kind] if requests else 0, self.get("errors"), \
            self.get("completed")
        guest0 = {name: self.get(name) for name in ("notifies", "waits", "glitches")}
        poll0 = self.poll_counts()
        self.commands.pending.put(1)
        time.sleep(warmup)
        waited0 = self.run_queue_waits()
        first, cpu0, vcpu0, started = self.get("completed"), self.server_cpu(), \
            cpu_seconds(os.getpid(), vcpu), time.perf_counter()
        time.sleep(seconds)
        last, cpu1, vcpu1, ended = self.get("completed"), self.server_cpu(), \
            cpu_seconds(os.getpid(), vcpu), time.perf_counter()
        waited = [after - before for after, before in zip(self.run_queue_waits(), waited0)]
        self.set("stop", 1)
        deadline = time.monotonic() + 30
        while self.get("cases") == cases:
            if self.vm.stop_reason is not None:
                raise BenchError(f"the guest stopped: {self.vm.stop_reason.message}")
            if time.monotonic() > deadline:
                raise BenchError(f"{case.label}: the guest did not drain its queue")
            time.sleep(0.001)
        if self.function.broken:
            raise BenchError(f"{case.label}: the device failed (needs reset)")
        if getattr(self.device, "failure", ""):
            raise BenchError(f"{case.label}: the C device stopped: {self.device.failure}")
        errors = self.get("errors") - errors0
        if errors:
            raise BenchError(f"{case.label}: {errors} requests completed with an error status")
        served = self.device.requests[kind] - device0 if requests else self.get("completed") - completed0
        if served != self.get("completed") - completed0:
            raise BenchError(f"{case.label}: the device served {served} requests, the guest "
                             f"counted {self.get('completed') - completed0}")
        if check:
            self.check_data(case, depth, image)
        span = ended - started
        ops = max(last - first, 1)
        per_request = (f"; per request: server {(cpu1 - cpu0) / ops * 1e6:.1f} µs CPU + "
                       f"{waited[0] / ops * 1e6:.1f} µs waiting for a CPU, vCPU "
                       f"{(vcpu1 - vcpu0) / ops * 1e6:.1f} µs CPU + {waited[1] / ops * 1e6:.1f} µs "
                       f"waiting for a CPU (threads: server {self.server_thread().native_id}, "
                       f"vCPU {vcpu})")
        polls = ", ".join(f"{name} {now - then}" for (name, now), then
                          in zip(self.poll_counts().items(), poll0.values()))
        return Rate((last - first) / span, case.size, (cpu1 - cpu0) / span, (vcpu1 - vcpu0) / span,
                    f"{self.device.name} served {served} requests; guest: " + ", ".join(
                        f"{name} {self.get(name) - value}" for name, value in guest0.items())
                    + (f"; polls: {polls}, window {self.function.poll_windows[0].ns} ns"
                       if polls else "") + per_request + self.c_counts())

    def c_counts(self) -> str:
        """The C device's own counts so far (wake-ups, passes, interrupts signalled)."""
        if not self.c_device:
            return ""
        return "; " + self.device.counters.summary()

    def poll_counts(self) -> dict[str, int]:
        """pykvm's device: how its polls of the avail ring ended so far (poll.py)."""
        windows = getattr(self.function, "poll_windows", None)
        if not windows or self.function.external:
            return {}
        return {name: getattr(windows[0], name) for name in ("found", "timeouts", "busy")}

    def pin(self) -> None:
        """--pin: the vCPU thread on CPU 0, the thread that serves the queue on CPU 1 (the
        scheduler otherwise often wakes the device thread on the vCPU's own CPU)."""
        server = self.server_thread()
        os.sched_setaffinity(self.vm.vcpus[0].thread.native_id, {0})
        os.sched_setaffinity(server.native_id, {1})

    def server_thread(self):
        """The thread that serves the queue: pykvm's device worker, or the C loop's."""
        return self.device.thread if self.c_device else self.function.worker.thread

    def run_queue_waits(self) -> tuple[float, float]:
        """Seconds the server thread and the vCPU thread have waited for a CPU so far."""
        server = self.server_thread()
        return (run_queue_seconds(os.getpid(), server.native_id),
                run_queue_seconds(os.getpid(), self.vm.vcpus[0].thread.native_id))

    def server_cpu(self) -> float:
        """CPU seconds so far of what serves the queue: pykvm's device thread, or the
        vhost-user daemon (all its threads) plus pykvm's thread that turns its used-buffer
        signals into interrupts."""
        own = cpu_seconds(os.getpid(), self.server_thread().native_id)
        daemon = getattr(self.device, "daemon", None)
        return own + (cpu_seconds(daemon.process.pid) if daemon is not None else 0.0)

    def last_requests(self, case: Case, depth: int) -> list[tuple[int, bytes]]:
        """(sector, data) of each slot's last request."""
        return [(struct.unpack("<Q", self.memory.read(HEADERS + 16 * i + 8, 8))[0],
                 self.memory.read(DATA + i * case.size, case.size)) for i in range(depth)]

    def check_data(self, case: Case, depth: int, image: Path) -> None:
        """Each slot's last request: its buffer and the file agree at its sector."""
        with open(image, "rb", buffering=0) as f:
            for i, (sector, data) in enumerate(self.last_requests(case, depth)):
                f.seek(sector * 512)
                if f.read(case.size) != data:
                    raise BenchError(f"{case.label}: slot {i}'s buffer is not the file's data "
                                     f"at sector {sector}")

    def close(self) -> None:
        self.vm.close()
        self.memory.close()


def filesystem_of(path: Path) -> str:
    done = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="measured span per case (1)")
    parser.add_argument("--image-mib", type=int, default=256, help="image size in MiB (256)")
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the image goes (default /dev/shm: a tmpfs, so writes never "
                        "wait for writeback to a disk; give a disk's directory to include that)")
    parser.add_argument("--spin", action="store_true",
                        help="the guest spins on the used index instead of waiting for the "
                        "device's interrupt (it then takes a host CPU for itself)")
    parser.add_argument("--backend", choices=("both", "pykvm", "vhost-user", "c", "pykvm+c",
                                              "all"),
                        default="both",
                        help="who serves the queue: pykvm's own virtio-blk, qemu-storage-daemon "
                        "over vhost-user, or both in turn against the same reference (both); "
                        "c: a C loop on the same VM, transport, doorbell and completion path "
                        "(bench/blk_c.py: the floor of this path on this host), pykvm+c: "
                        "pykvm's device and the C loop in turn; all: the three in turn")
    parser.add_argument("--transport", choices=("pci", "mmio"), default="pci",
                        help="pykvm's own device on virtio-pci (default) or virtio-mmio (one "
                        "per run: both would lock the one image; vhost-user stays on PCI)")
    parser.add_argument("--msix", action="store_true",
                        help="with --spin: the queue interrupts on an MSI-X vector (a KVM irqfd, "
                        "which a vhost-user back end signals directly) instead of INTx")
    parser.add_argument("--poll-us", type=float, default=None,
                        help="pykvm's device: the avail-ring polling cap in µs (0: off; default: "
                        "pykvm's own, pykvm/devices/virtio/poll.py); the C device: a fixed "
                        "window this long (default 0: no polling)")
    parser.add_argument("--guest-poll", type=int, default=0, metavar="N",
                        help="the waiting guest first looks at the used index N more times, a "
                        "pause between looks (like Linux's haltpoll; default 0: it waits at once)")
    parser.add_argument("--depth", type=int, choices=DEPTHS, default=None,
                        help="only this queue depth (default: both)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the vCPU thread to CPU 0 and the queue's server thread to "
                        "CPU 1 (needs 2 CPUs)")
    parser.add_argument("--only", choices=("seq", "rand"), default=None,
                        help="only the 1 MiB sequential or the 4 KiB random cases")
    parser.add_argument("--quick", action="store_true", help="0.2 s per case: does it work?")
    parser.add_argument("--record", action="store_true", help="add rows to bench/RESULTS.md")
    args = parser.parse_args(argv)
    seconds, warmup = (0.2, 0.1) if args.quick else (args.seconds, 0.3)
    image_size = args.image_mib << 20
    if args.msix and (not args.spin or args.transport != "pci"):
        parser.error("--msix needs --spin (a ring-3 guest cannot wait for an MSI) and PCI")
    if "c" in args.backend.split("+") and args.transport != "pci":
        parser.error("the C device is on virtio-pci only")
    if args.pin and not {0, 1} <= os.sched_getaffinity(0):
        parser.error("--pin needs CPUs 0 and 1")
    if args.image_mib < 64 or args.image_mib & (args.image_mib - 1):
        parser.error("--image-mib must be a power of two, at least 64")

    from pykvm.kvm import Kvm

    load = os.getloadavg()[0]
    rows = []
    try:
        with Kvm() as kvm, tempfile.TemporaryDirectory(prefix="pykvm-bench-",
                                                       dir=args.dir) as tmp:
            guest = assemble(GUEST_SOURCE, Path(tmp), LOAD_ADDR)
            image = Path(tmp) / "bench.img"
            chunk = os.urandom(1 << 20)
            with open(image, "wb") as f:
                for _ in range(args.image_mib):
                    f.write(chunk)
            fs = filesystem_of(image)
            host_kind = kvm.host_kind
            backends = [name for name in ("pykvm", "vhost-user", "c")
                        if args.backend in (name, "all") or name in args.backend.split("+")
                        or (args.backend == "both" and name != "c")]
            lib = None
            if "c" in backends:
                import blk_c
                import cqueue
                lib = cqueue.build(Path(tmp))
            if args.transport == "mmio" and "pykvm" in backends:
                backends[backends.index("pykvm")] = "pykvm-mmio"
            if "vhost-user" in backends and not storage_daemon_available():
                print("blk: qemu-storage-daemon is not installed (apt-get install "
                      "qemu-system-common): no vhost-user-blk figures", file=sys.stderr)
                backends.remove("vhost-user")
            disks = {}
            try:
                for name in backends:
                    device = vhost_device(image) if name == "vhost-user" \
                        else blk_c.CBlockDevice(lib, image, int((args.poll_us or 0) * 1000)) \
                        if name == "c" else BlockDevice(str(image), name="bench-blk")
                    disks[name] = GuestDisk(kvm, guest, device, not args.spin,
                                            "mmio" if name == "pykvm-mmio" else "pci",
                                            args.msix)
                    if args.poll_us is not None and name != "c":
                        configure(disks[name].function, int(args.poll_us * 1000))
                    disks[name].set("guest_poll", args.guest_poll)
                    if args.pin:
                        disks[name].pin()
                for case in CASES:
                    if args.only and case.random != (args.only == "rand"):
                        continue
                    for depth in DEPTHS:
                        if args.depth and depth != args.depth:
                            continue
                        reference = host_rate(next(iter(disks.values())).memory, image, case,
                                              depth, image_size, warmup, seconds)
                        rates = {}
                        for name, disk in disks.items():
                            rates[name] = disk.run(case, depth, image, image_size, warmup,
                                                   seconds)
                            if not args.quick:
                                print(f"{case.label} QD{depth}: {rates[name].note}",
                                      file=sys.stderr)
                        rows.append((case, depth, reference, rates))
            finally:
                for disk in disks.values():
                    disk.close()
    except BenchError as error:
        print(f"blk: {error}", file=sys.stderr)
        return 1

    print("virtio-blk driven by a ring-3 guest vs the host's preadv/pwritev on the same file")
    print(f"host kind: {host_kind}   {seconds:g} s per case   load average: {load:.2f}   "
          f"CPUs: {os.cpu_count()}   guest: {'spins' if args.spin else 'waits for interrupts'}"
          f"{', MSI-X' if args.msix else ''}{', pinned (vCPU 0, server 1)' if args.pin else ''}"
          f"{f', polls the used index {args.guest_poll} times first' if args.guest_poll else ''}"
          f"   device polling cap: "
          f"{'default' if args.poll_us is None else f'{args.poll_us:g} µs'}")
    print(f"image: {args.image_mib} MiB on {fs}, read whole before each case (all in the page "
          f"cache; writes dirty cached pages, no O_DIRECT, no fsync)")
    print("host: one thread, synchronous calls, as many buffers as the queue depth; "
          "pykvm: its own virtio-blk; vhost-user: qemu-storage-daemon serving the queue; "
          "srv/vCPU: CPU share of what serves the queue (pykvm's device thread; the daemon "
          "plus pykvm's interrupt thread; the C loop's thread) / of the vCPU thread; c: bench/c/"
          "blk_serve.c serving the queue on the same VM, doorbell and completion path")
    print(f"{'case':<16} {'QD':>3} | {'host MB/s':>9} {'IOPS':>7} | " + " | ".join(
        f"{name:>10} MB/s {'IOPS':>7} {'srv/vCPU':>9} {'/host':>6}" for name in backends))
    for case, depth, reference, rates in rows:
        print(f"{case.label:<16} {depth:>3} | {reference.mb_per_s:>9.1f} "
              f"{reference.ops_per_s:>7.0f} | " + " | ".join(
                  f"{rate.mb_per_s:>15.1f} {rate.ops_per_s:>7.0f} "
                  f"{f'{rate.cpu:.0%}/{rate.vcpu:.0%}':>9} "
                  f"{rate.mb_per_s / (reference.mb_per_s or 1):>6.3f}"
                  for rate in rates.values()))
    if args.record:
        record(host_kind, rows, seconds, load, ("wait" if not args.spin
               else "spin, MSI-X" if args.msix else "spin")
               + (f", guest polls {args.guest_poll}" if args.guest_poll and not args.spin else "")
               + (f", --poll-us {args.poll_us:g}" if args.poll_us is not None else "")
               + (", pinned" if args.pin else ""))
    headline = [(r, p) for c, d, r, p in rows if c is CASES[0] and d == max(DEPTHS)] or \
        [(r, p) for c, d, r, p in rows if d == max(DEPTHS)] or [(r, p) for c, d, r, p in rows]
    reference, rates = headline[0]
    rate = next(iter(rates.values()))
    print(f"ratio: {rate.mb_per_s / (reference.mb_per_s or 1):.3f}")
    return 0


def storage_daemon_available() -> bool:
    from pykvm.vhost_user.daemon import storage_daemon_path
    return storage_daemon_path() is not None


def vhost_device(image: Path):
    """A vhost-user-blk device over ``image``: qemu-storage-daemon serving it raw, as
    ``pykvm run --disk IMG,backend=vhost-user`` does, but without pykvm's flock (pykvm's
    own device of the same run holds it; the two never have requests in flight at once)."""
    from pykvm.devices.virtio.vhost_blk import VhostBlkDevice
    from pykvm.vhost_user.daemon import start_storage_daemon
    from pykvm.vhost_user.frontend import Frontend

    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    daemon = start_storage_daemon(fd, "raw", name="bench-vhost-blk")
    try:
        frontend = Frontend.connect(daemon.socket_path, "bench-vhost-blk")
        daemon.connected()
        return VhostBlkDevice(frontend, daemon=daemon, name="bench-vhost-blk", image_fd=fd)
    except BaseException:
        daemon.stop()
        os.close(fd)
        raise


ROWS_MARKER = "<!-- blk.py --record adds rows above this line -->"
VHOST_ROWS_MARKER = "<!-- blk.py --record adds vhost-user-blk rows above this line -->"


def record(host_kind: str, rows, seconds: float, load: float, guest: str) -> None:
    """pykvm's own device: a row per case in the first table, as always; with the
    vhost-user back end measured too, a row per case in the second, both back ends side
    by side against the same host reference."""
    today = datetime.date.today().isoformat()
    own, vhost = "", ""
    for case, depth, reference, rates in rows:
        ratio = {name: rate.mb_per_s / (reference.mb_per_s or 1) for name, rate in rates.items()}
        label = case.label + (" (virtio-mmio)" if "pykvm-mmio" in rates else "")
        head = (f"| {today} | {host_kind} | {label} | {depth} | "
                f"{reference.mb_per_s:.0f} ({reference.ops_per_s:,.0f}) | ")
        tail = f"{guest} | {load:.1f} | {seconds:g} s |\n"
        own_name = "pykvm-mmio" if "pykvm-mmio" in rates else "pykvm"
        rate = rates.get(own_name)
        if rate is not None:
            own += (head + f"{rate.mb_per_s:.0f} ({rate.ops_per_s:,.0f}) | {ratio[own_name]:.3f} | "
                    f"{rate.cpu:.0%} / {rate.vcpu:.0%} | " + tail)
        vrate = rates.get("vhost-user")
        if vrate is not None:
            vhost += (head + (f"{ratio[own_name]:.3f} | " if rate is not None else "- | ")
                      + f"{vrate.mb_per_s:.0f} ({vrate.ops_per_s:,.0f}) | "
                      f"{ratio['vhost-user']:.3f} | {vrate.cpu:.0%} / {vrate.vcpu:.0%} | " + tail)
    if own:
        add_rows(ROWS_MARKER, own, RESULTS)
    if vhost:
        add_rows(VHOST_ROWS_MARKER, vhost, RESULTS)

if __name__ == "__main__":
    sys.exit(main())
