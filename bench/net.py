#!/usr/bin/env python3
"""virtio-net through a TAP, guest to host and host to guest, against two veth
ends on the host: frames per second for 64-byte and 1500-byte Ethernet frames.

pykvm side: a real VM whose guest (bench/guests/net_loop.S, assembled at run
time) drops to ring 3 -- native speed on every host, kvm_pvm included -- and
owns one virtio-net queue of a real NetDevice on a real VirtioPciDevice over a
TAP. The bench plays the driver's probe from the host (features, rings, every
descriptor written once); the guest then only moves avail indexes and rings the
doorbell (an ioeventfd) when the device asks for it (EVENT_IDX). With nothing to
do it sets used_event and waits for the device's interrupt in a read of a bench
port (flatguest.WAIT_PORT: the one exit to Python per wait), as an interrupt-driven driver would
(--spin: it spins instead, and takes a host CPU for itself).

- transmit: the guest keeps all 256 frames of its queue in flight; the device
  writev()s each to the TAP. The host counts what arrived: the TAP's kernel
  rx_packets counter (netlink), cross-checked with the device's own count.
- receive: a sender process on the host writes frames to the TAP's host side
  with a raw AF_PACKET socket as fast as it can; the device readv()s them into
  the guest's buffers and the guest counts them (its counter, in guest RAM).
  Frames the guest could not take in time are dropped by the TAP's queue.

Reference (the limit): the same sender process, the same frames, on one end of
a veth pair; the other end's kernel rx_packets counter counts. Both directions
compare with it: it is what the host's own stack does with those frames when
nothing is in the way. Everything happens in a network namespace the bench
creates (and removes); no frame leaves it.

Besides frames/s by the wall clock, each path's CPU time is measured over the
same span (the sender process for veth; pykvm's device threads, i.e. the queue
worker and the TAP watcher, for pykvm) and given as frames per CPU-second: on a
shared host where the wall clock depends on who else runs, that is the figure
that says what the path costs.

    python3 bench/net.py                # 3 s per case, 64 and 1500 bytes, both directions
    python3 bench/net.py --seconds 10
    python3 bench/net.py --quick        # 0.5 s per case: does it work?
    python3 bench/net.py --record       # also append the table to bench/RESULTS.md
    python3 bench/net.py --c-tx         # also transmit with a C loop serving the queue (below)

``--c-tx``: each size's transmit case runs a second time with the TX queue served by
a C loop (bench/c/net_tx_serve.c on bench/c/virtq.h, run by bench/cqueue.py) instead
of pykvm's worker: the same guest, VM, NIC, TAP, doorbell ioeventfd and completion
path (an eventfd the wait register blocks on), one writev() per frame. What it cannot
beat is the host; pykvm ÷ C is what pykvm's Python costs. Not recorded: the rows have
no column for it.

The passt back end (--net user, pykvm/net/stream.py) has a transmit case beside
the TAP's when passt is installed: the same guest and frames, the NIC's wire a
passt pykvm starts in the bench's namespace (its uplink: the veth pair, given an
address and a default route). passt reads each length-prefixed frame and drops
it (no protocol takes the ethertype); frames/s are the device's written frames,
which the socket's buffer holds to what passt takes; CPU is the device threads
plus passt's. ``--no-passt`` skips it.

Needs root (TAPs, namespaces), /dev/kvm, GNU as/ld, pyroute2. Last line:
``ratio: X`` = pykvm transmit frames/s / veth frames/s for 1500-byte frames.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flatguest import (WAIT_PORT, BenchError, EventfdWaiter, Waiter, assemble,  # noqa: E402
                       cpu_seconds)
from results import add_rows  # noqa: E402

GUEST_SOURCE = BENCH / "guests" / "net_loop.S"
RESULTS = BENCH / "RESULTS.md"

ETHERTYPE = 0x88B5                      # IEEE local experimental: no protocol takes it
GUEST_MAC = bytes.fromhex("525400000b01")
SENDER_MAC = bytes.fromhex("020000000b02")
NET_HDR = 12
QUEUE = 256
BUFFER = 2048
MEM_SIZE = 16 << 20
LOAD_ADDR = 0x10000
PARAMS = 8                              # offset of the guest's parameter block
RX_RING, TX_RING = 0x100000, 0x110000
TX_BUFFERS, RX_BUFFERS = 0x200000, 0x400000
BAR_ADDR = 0xC0000000                   # where the bench "maps" the device's BAR


def frame(size: int, dst: bytes = GUEST_MAC, seq: int = 0) -> bytes:
    """An Ethernet frame of ``size`` bytes (no FCS): header, a sequence number, a pattern."""
    head = dst + SENDER_MAC + struct.pack("!HI", ETHERTYPE, seq)
    return head + bytes((i * 7) & 0xFF for i in range(size - len(head)))


# --- the sender: a separate process, so it does not share pykvm's interpreter ---------
def sender_main(netns: str, ifname: str, size: int, seconds: float) -> int:
    from pykvm.net.plumbing import entered_netns, open_netns

    fd = open_netns(netns)
    with entered_netns(fd):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        sock.bind((ifname, 0))
    data = frame(size)
    send = sock.send
    sent = 0
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while True:
        for _ in range(256):
            try:
                send(data)
            except (BlockingIOError, OSError):
                pass                    # a full qdisc: the kernel said no, keep trying
            sent += 1
        if time.monotonic() >= deadline:
            break
    print(sent)
    return 0


def start_sender(netns: str, ifname: str, size: int, seconds: float) -> subprocess.Popen:
    """The sender process, once it is ready to send (its start-up is not measured)."""
    sender = subprocess.Popen([sys.executable, __file__, "--sender", netns, ifname, str(size),
                               str(seconds)], stdout=subprocess.PIPE, text=True)
    if sender.stdout.readline().strip() != "ready":
        sender.wait(timeout=30)
        raise BenchError(f"the sender process failed (status {sender.returncode})")
    return sender


# --- the host's counters ---------------------------------------------------------------
def rx_packets(ifname: str) -> int:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return link.get_attr("IFLA_STATS64")["rx_packets"]


@dataclass
class Result:
    frames_per_s: float        # wall clock
    cpu: float                 # CPU seconds per second the measured path used
    size: int
    note: str = ""

    @property
    def gbit(self) -> float:
        return self.frames_per_s * self.size * 8 / 1e9

    @property
    def per_cpu_second(self) -> float:
        """Frames per CPU-second: what the path costs, whatever else the host runs."""
        return self.frames_per_s / self.cpu if self.cpu else 0.0


def sample(counter, cpu, warmup: float, seconds: float) -> tuple[float, float]:
    """(frames/s, CPU s/s) of a growing ``counter()`` and ``cpu()`` clock over
    ``seconds`` after ``warmup``."""
    time.sleep(warmup)
    first, cpu_first, started = counter(), cpu(), time.perf_counter()
    time.sleep(seconds)
    last, cpu_last, ended = counter(), cpu(), time.perf_counter()
    return (last - first) / (ended - started), (cpu_last - cpu_first) / (ended - started)


# --- the reference: a veth pair ------------------------------------------------------------
def veth_rate(netns: str, size: int, warmup: float, seconds: float) -> Result:
    sender = start_sender(netns, "pbveth0", size, warmup + seconds + 0.5)
    try:
        rate, cpu = sample(lambda: rx_packets("pbveth1"), lambda: cpu_seconds(sender.pid),
                           warmup, seconds)
    finally:
        sender.communicate(timeout=30)
    return Result(rate, cpu, size, "sender process CPU")


# --- the pykvm side ---------------------------------------------------------------------------
def assemble_guest(workdir: Path) -> bytes:
    return assemble(GUEST_SOURCE, workdir, LOAD_ADDR)


class GuestNic:
    """A VM with one virtio-net function on TAP ``pbtap0``, its queues set up as a
    driver would, and the ring-3 guest told which queue to drive."""

    def __init__(self, kvm, image: bytes, mode: str, size: int, spin: bool = False,
                 backend: str = "tap", poll_ns: int | None = None, c_lib=None):
        from pykvm.boot.modes import set_mode
        from pykvm.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
        from pykvm.devices.virtio.driver import DriverRing, PciDriver
        from pykvm.devices.virtio.net import (VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
                                              VIRTIO_NET_F_STATUS, NetDevice)
        from pykvm.devices.virtio.pci import NOTIFY_MULTIPLIER, NOTIFY_OFFSET, VirtioPciDevice
        from pykvm.devices.virtio.queue import DESC_F_WRITE
        from pykvm.memory import GuestMemory
        from pykvm.net.plumbing import NetSpec, open_nic
        from pykvm.vstate.vm import Vm

        self.mode, self.size = mode, size
        self.memory = GuestMemory.anonymous(MEM_SIZE)
        self.vm = Vm(kvm, self.memory)
        spec = NetSpec(tap="pbtap0") if backend == "tap" else NetSpec(mode="user")
        self.backend = open_nic(spec, GUEST_MAC)
        self.device = NetDevice(getattr(self.backend, "wire", None) or self.backend.tap,
                                GUEST_MAC, offloads=False, name="bench-net", owner=self.backend)
        self.function = VirtioPciDevice(self.vm, self.memory, self.device)
        self.vm.on_close(self.function.close)
        if poll_ns is not None:                     # --poll-us: pykvm's avail-ring polling cap
            from pykvm.devices.virtio.poll import configure
            configure(self.function, poll_ns)
        self.function.bar_mapped(0, BAR_ADDR)       # doorbells become ioeventfds in KVM
        self.c_queue = None                         # --c-tx: the C loop serving the TX queue
        # The C loop signals its waiter's eventfd itself; pykvm's device raises INTx.
        self.waiter = EventfdWaiter() if c_lib is not None else Waiter(self.function)
        self.function.intx = self.waiter
        self.vm.add_pio_device(WAIT_PORT, 4, self.waiter)
        driver = PciDriver(self.function)
        if not driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | VIRTIO_NET_F_MAC
                                | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF) & 8:
            raise BenchError("the device refused the bench's features")
        self.rx, self.tx = DriverRing(self.memory, RX_RING, QUEUE), \
            DriverRing(self.memory, TX_RING, QUEUE)
        driver.setup_queue(0, self.rx)
        driver.setup_queue(1, self.tx)
        payload = bytes(NET_HDR) + frame(size, dst=SENDER_MAC)
        for i in range(QUEUE):
            self.memory.write(TX_BUFFERS + BUFFER * i, payload)
            self.tx.write_descriptor(i, TX_BUFFERS + BUFFER * i, len(payload))
            self.rx.write_descriptor(i, RX_BUFFERS + BUFFER * i, BUFFER, DESC_F_WRITE)
            for ring in (self.tx, self.rx):
                self.memory.write_u16(ring.avail_addr + 4 + 2 * i, i)
        ring, queue = (self.tx, 1) if mode == "tx" else (self.rx, 0)
        if mode == "rx":
            self.rx.set_avail_idx(QUEUE)              # every receive buffer offered
        driver.driver_ok()
        if c_lib is not None:
            from cqueue import CQueue
            if mode != "tx" or backend != "tap":
                raise BenchError("the C loop serves the TAP's transmit queue only")
            self.c_queue = CQueue(c_lib.net_tx_serve, self.device.wire.fd)
            self.c_queue.start(self.function, self.memory, 1,
                               BAR_ADDR + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * 1, self.waiter.fd)
        params = struct.pack("<11Q", 0 if mode == "tx" else 1, QUEUE, ring.avail_addr,
                             ring.used_addr, BAR_ADDR + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * queue,
                             queue, 0, 0, 0, 0 if spin else WAIT_PORT, 0)
        image = bytearray(image)
        image[PARAMS:PARAMS + len(params)] = params
        self.memory.write(LOAD_ADDR, bytes(image))
        self.vm.create_vcpus(1)
        set_mode(self.vm.vcpus[0], self.memory, "long", LOAD_ADDR)

    def guest_counter(self, index: int) -> int:
        return self.memory.read_u64(LOAD_ADDR + PARAMS + 8 * index)

    def start(self) -> None:
        self.vm.start()

    def check_received(self) -> None:
        """The last frames the guest was given must be the sender's, header first."""
        used = self.rx.used_idx()
        expected = frame(self.size)
        for back in range(1, 4):
            slot = (used - back) % QUEUE
            head, length = struct.unpack("<II", self.memory.read(self.rx.used_addr + 4 + 8 * slot,
                                                                  8))
            data = self.memory.read(RX_BUFFERS + BUFFER * head, length)
            if length != NET_HDR + self.size or data[NET_HDR:] != expected or \
                    struct.unpack_from("<H", data, 10)[0] != 1:
                raise BenchError(f"receive: used entry {slot} holds {length} bytes that are not "
                                 f"the sender's frame")

    def check_sent(self) -> None:
        """What reaches the TAP's host side must be the guest's frame, unchanged."""
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        sock.bind(("pbtap0", 0))
        sock.settimeout(2)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            raise BenchError("transmit: no frame reached the TAP's host side") from None
        finally:
            sock.close()
        if data != frame(self.size, dst=SENDER_MAC):
            raise BenchError("transmit: the frame on the TAP is not the guest's")

    def close(self) -> None:
        if self.c_queue is not None:
            self.c_queue.stop()
        self.vm.close()
        self.memory.close()
        if self.c_queue is not None:
            self.waiter.close()


def pykvm_rate(kvm, image: bytes, netns: str, mode: str, size: int, warmup: float,
               seconds: float, spin: bool = False, backend: str = "tap",
               poll_ns: int | None = None, c_lib=None) -> Result:
    nic = GuestNic(kvm, image, mode, size, spin, backend, poll_ns, c_lib)
    try:
        nic.start()
        wire = nic.device.wire
        threads = [nic.function.worker.thread.native_id, wire._watcher.thread.native_id]
        if getattr(wire, "_writer", None) is not None:
            threads.append(wire._writer.thread.native_id)
        if nic.c_queue is not None:                 # what serves the TX queue: the C loop
            threads = [nic.c_queue.thread.native_id]
        device_cpu = lambda: sum(cpu_seconds(os.getpid(), tid) for tid in threads)  # noqa: E731
        if backend == "passt":
            passt = nic.backend.passt
            rate, cpu = sample(lambda: nic.device.stats["tx_frames"],
                               lambda: device_cpu() + cpu_seconds(passt.pid), warmup, seconds)
            stats = nic.device.stats
            if stats["tx_errors"] or not passt.alive():
                raise BenchError(f"passt: {stats['tx_errors']} frames refused, passt "
                                 f"{'running' if passt.alive() else 'exited'}: "
                                 f"{passt.last_message()}")
            note = (f"device wrote {stats['tx_frames']}, short writes "
                    f"{wire.stats['tx_short_writes']}; doorbells {nic.guest_counter(7)}, "
                    f"waits {nic.guest_counter(10)}")
        elif mode == "tx" and nic.c_queue is not None:
            rate, cpu = sample(lambda: rx_packets("pbtap0"), device_cpu, warmup, seconds)
            nic.check_sent()
            counts = nic.c_queue.counters
            if nic.c_queue.failure:
                raise BenchError(f"the C loop stopped: {nic.c_queue.failure}")
            note = (f"C loop wrote {counts.writes}, errors {counts.errors}; doorbells "
                    f"{nic.guest_counter(7)}, waits {nic.guest_counter(10)}; {counts.summary()}")
        elif mode == "tx":
            rate, cpu = sample(lambda: rx_packets("pbtap0"), device_cpu, warmup, seconds)
            nic.check_sent()
            stats = nic.device.stats
            note = (f"device wrote {stats['tx_frames']}, errors {stats['tx_errors']}; "
                    f"doorbells {nic.guest_counter(7)}, waits {nic.guest_counter(10)}, "
                    f"glitches {nic.guest_counter(8)}")
        else:
            sender = start_sender(netns, "pbtap0", size, warmup + seconds + 0.5)
            try:
                rate, cpu = sample(lambda: nic.guest_counter(6), device_cpu, warmup, seconds)
            finally:
                sent = int(sender.communicate(timeout=30)[0] or 0)
            nic.check_received()
            note = (f"sender {sent} frames, guest got {nic.guest_counter(6)}; "
                    f"doorbells {nic.guest_counter(7)}, waits {nic.guest_counter(10)}, "
                    f"glitches {nic.guest_counter(8)}")
        stop = nic.vm.stop_reason
        if stop is not None:
            raise BenchError(f"the guest stopped: {stop.message}")
        window = nic.function.poll_windows[0 if mode == "rx" else 1]
        if nic.c_queue is None:
            note += (f"; polls: found {window.found}, timeouts {window.timeouts}, busy "
                     f"{window.busy}, give-ups {window.give_ups}")
        return Result(rate, cpu, size, note)
    finally:
        nic.close()


# --- the bench -------------------------------------------------------------------------------
@contextlib.contextmanager
def bench_namespace():
    """A network namespace of our own with a veth pair, this thread inside it."""
    from pyroute2 import IPRoute
    from pyroute2 import netns as pyroute_netns

    from pykvm.net.plumbing import entered_netns, open_netns

    name = f"pykvm-bench-{os.getpid()}"
    pyroute_netns.create(name)
    fd = open_netns(name)
    try:
        with entered_netns(fd):
            for path in ("all", "default"):
                Path(f"/proc/sys/net/ipv6/conf/{path}/disable_ipv6").write_text("1")
            with IPRoute() as ipr:
                ipr.link("add", ifname="pbveth0", kind="veth", peer="pbveth1")
                for ifname in ("pbveth0", "pbveth1"):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
                # passt's template: an address and a default route (to no one)
                index = ipr.link_lookup(ifname="pbveth0")[0]
                ipr.addr("add", index=index, address="10.78.0.2", prefixlen=24)
                ipr.route("add", dst="0.0.0.0/0", gateway="10.78.0.1")
            yield name
    finally:
        os.close(fd)
        pyroute_netns.remove(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--sender"]:
        return sender_main(argv[1], argv[2], int(argv[3]), float(argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured span per case (3)")
    parser.add_argument("--sizes", default="64,1500", help="frame sizes in bytes (64,1500)")
    parser.add_argument("--quick", action="store_true", help="0.5 s per case: does it work?")
    parser.add_argument("--spin", action="store_true",
                        help="an idle guest spins instead of waiting for the device's interrupt")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--c-tx", action="store_true",
                        help="also transmit with a C loop serving the TX queue (the floor of "
                        "the path without Python; needs gcc)")
    parser.add_argument("--no-passt", action="store_true", help="skip the passt back end")
    parser.add_argument("--poll-us", type=float, default=None,
                        help="pykvm's device: the avail-ring polling cap in µs (0: off; default: "
                        "pykvm's own, pykvm/devices/virtio/poll.py)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("net: needs root (TAP devices and a network namespace)", file=sys.stderr)
        return 1
    seconds, warmup = (0.5, 0.2) if args.quick else (args.seconds, 0.5)
    poll_ns = None if args.poll_us is None else int(args.poll_us * 1000)
    sizes = [int(s) for s in args.sizes.split(",")]
    if any(not 60 <= s <= 1514 for s in sizes):
        parser.error("frame sizes must be between 60 and 1514 bytes")

    from pykvm.kvm import Kvm
    from pykvm.net.passt import passt_binary

    with_passt = not args.no_passt and passt_binary() is not None
    rows, passt_rows, c_rows = [], [], []
    load = os.getloadavg()[0]
    try:
        with Kvm() as kvm, tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp, \
                bench_namespace() as netns:
            image = assemble_guest(Path(tmp))
            host_kind = kvm.host_kind
            c_lib = None
            if args.c_tx:
                from cqueue import build
                c_lib = build(Path(tmp))
            for size in sizes:
                reference = veth_rate(netns, size, warmup, seconds)
                tx = pykvm_rate(kvm, image, netns, "tx", size, warmup, seconds, args.spin,
                                poll_ns=poll_ns)
                rx = pykvm_rate(kvm, image, netns, "rx", size, warmup, seconds, args.spin,
                                poll_ns=poll_ns)
                rows.append((size, reference, tx, rx))
                if c_lib is not None:
                    c_tx = pykvm_rate(kvm, image, netns, "tx", size, warmup, seconds, args.spin,
                                      c_lib=c_lib)
                    c_rows.append((size, reference, c_tx, tx))
                    if not args.quick:
                        print(f"{size} B: C tx {c_tx.frames_per_s:,.0f}/s ({c_tx.note})",
                              file=sys.stderr)
                if with_passt:
                    passt = pykvm_rate(kvm, image, netns, "tx", size, warmup, seconds, args.spin,
                                       backend="passt", poll_ns=poll_ns)
                    passt_rows.append((size, reference, passt, tx))
                    if not args.quick:
                        print(f"{size} B: passt tx {passt.frames_per_s:,.0f}/s ({passt.note})",
                              file=sys.stderr)
                if not args.quick:
                    print(f"{size} B: veth {reference.frames_per_s:,.0f}/s; pykvm tx "
                          f"{tx.frames_per_s:,.0f}/s ({tx.note}); rx {rx.frames_per_s:,.0f}/s "
                          f"({rx.note})", file=sys.stderr)
    except BenchError as error:
        print(f"net: {error}", file=sys.stderr)
        return 1

    print("virtio-net over a TAP vs a veth pair (raw AF_PACKET sender, one frame per send())")
    print(f"host kind: {host_kind}   {seconds:g} s per case   load average: {load:.2f}   "
          f"CPUs: {os.cpu_count()}")
    print("frames/s by the wall clock; k/CPU-s: thousands of frames per CPU-second of the path "
          "(veth: the sender process; pykvm: its device threads)")
    print(f"{'frame':>6} {'veth /s':>9} {'Gbit/s':>6} {'k/CPU-s':>7} | {'tx /s':>8} {'Gbit/s':>6} "
          f"{'k/CPU-s':>7} {'tx/veth':>7} | {'rx /s':>8} {'Gbit/s':>6} {'k/CPU-s':>7} "
          f"{'rx/veth':>7}")
    for size, reference, tx, rx in rows:
        base = reference.frames_per_s or 1
        print(f"{size:>5}B {reference.frames_per_s:>9,.0f} {reference.gbit:>6.3f} "
              f"{reference.per_cpu_second / 1000:>7.1f} | "
              f"{tx.frames_per_s:>8,.0f} {tx.gbit:>6.3f} {tx.per_cpu_second / 1000:>7.1f} "
              f"{tx.frames_per_s / base:>7.3f} | "
              f"{rx.frames_per_s:>8,.0f} {rx.gbit:>6.3f} {rx.per_cpu_second / 1000:>7.1f} "
              f"{rx.frames_per_s / base:>7.3f}")
    if passt_rows:
        print("virtio-net through passt (--net user), guest to host, vs the same veth reference")
        print(f"{'frame':>6} {'veth /s':>9} | {'passt /s':>8} {'Gbit/s':>6} {'k/CPU-s':>7} "
              f"{'p/veth':>7} {'p/tap':>7}")
        for size, reference, passt, tx in passt_rows:
            print(f"{size:>5}B {reference.frames_per_s:>9,.0f} | {passt.frames_per_s:>8,.0f} "
                  f"{passt.gbit:>6.3f} {passt.per_cpu_second / 1000:>7.1f} "
                  f"{passt.frames_per_s / (reference.frames_per_s or 1):>7.3f} "
                  f"{passt.frames_per_s / (tx.frames_per_s or 1):>7.3f}")
    if c_rows:
        print("C floor: the transmit queue served by bench/c/net_tx_serve.c (same VM, TAP, "
              "doorbell, completion path), vs the same veth reference")
        print(f"{'frame':>6} {'veth /s':>9} | {'C tx /s':>8} {'Gbit/s':>6} {'k/CPU-s':>7} "
              f"{'C/veth':>7} {'pykvm/C':>7}")
        for size, reference, c_tx, tx in c_rows:
            print(f"{size:>5}B {reference.frames_per_s:>9,.0f} | {c_tx.frames_per_s:>8,.0f} "
                  f"{c_tx.gbit:>6.3f} {c_tx.per_cpu_second / 1000:>7.1f} "
                  f"{c_tx.frames_per_s / (reference.frames_per_s or 1):>7.3f} "
                  f"{tx.frames_per_s / (c_tx.frames_per_s or 1):>7.3f}")
    if args.record:
        record(host_kind, rows, seconds, load)
        if passt_rows:
            record_passt(host_kind, passt_rows, seconds, load)
    big = [row for row in rows if row[0] == max(sizes)][0]
    print(f"ratio: {big[2].frames_per_s / (big[1].frames_per_s or 1):.3f}")
    return 0


ROWS_MARKER = "<!-- net.py --record adds rows above this line -->"


def record(host_kind: str, rows, seconds: float, load: float) -> None:
    lines = ""
    for size, reference, tx, rx in rows:
        base = reference.frames_per_s or 1
        lines += (f"| {datetime.date.today().isoformat()} | {host_kind} | {size} | "
                  f"{reference.frames_per_s:,.0f} ({reference.gbit:.2f}; "
                  f"{reference.per_cpu_second / 1000:.0f}k) | "
                  f"{tx.frames_per_s:,.0f} ({tx.gbit:.2f}; {tx.per_cpu_second / 1000:.0f}k) | "
                  f"{tx.frames_per_s / base:.3f} | "
                  f"{rx.frames_per_s:,.0f} ({rx.gbit:.2f}; {rx.per_cpu_second / 1000:.0f}k) | "
                  f"{rx.frames_per_s / base:.3f} | {load:.1f} | {seconds:g} s |\n")
    add_rows(ROWS_MARKER, lines, RESULTS)


PASST_MARKER = "<!-- net.py --record adds passt rows above this line -->"


def record_passt(host_kind: str, rows, seconds: float, load: float) -> None:
    lines = ""
    for size, reference, passt, tx in rows:
        lines += (f"| {datetime.date.today().isoformat()} | {host_kind} | {size} | "
                  f"{reference.frames_per_s:,.0f} | "
                  f"{passt.frames_per_s:,.0f} ({passt.gbit:.2f}; "
                  f"{passt.per_cpu_second / 1000:.0f}k) | "
                  f"{passt.frames_per_s / (reference.frames_per_s or 1):.3f} | "
                  f"{passt.frames_per_s / (tx.frames_per_s or 1):.3f} | {load:.1f} | "
                  f"{seconds:g} s |\n")
    add_rows(PASST_MARKER, lines, RESULTS)


if __name__ == "__main__":
    sys.exit(main())
