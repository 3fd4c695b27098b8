#!/usr/bin/env python3
"""Where pykvm's per-exit time goes: candidate run loops against the C reference.

bench/exits.py measures pykvm's real Vcpu.run_loop. This script runs the same
guest through variants of that loop (each a Vcpu subclass whose run_loop keeps
or drops one ingredient), each run next to a C reference run, and prints the µs
per exit of each (process CPU time by default, as bench/exits.py) and its ratio
to C. It is how the changes proposed for pykvm/vcpu.py in bench/RESULTS.md were
measured; the loops below are the exact code measured (Proposed.run_loop is the
proposed replacement of Vcpu.run_loop).

    python3 bench/profile_exits.py                 # every variant, 15 rounds of 5000 exits
    python3 bench/profile_exits.py -v current proposed -r 11
    python3 bench/profile_exits.py --micro         # per-operation costs, no guest
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import statistics
import struct
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exits as bench  # noqa: E402  (also puts the repository on sys.path)

from pykvm import ioctl as k  # noqa: E402
from pykvm.errors import KvmError  # noqa: E402
from pykvm.vcpu import _EXIT_OFFSET, _EXIT_REASON, _IMMEDIATE_EXIT_OFFSET, _IO, Vcpu  # noqa: E402

KVM_RUN = k.KVM_RUN
KVM_EXIT_IO = k.KVM_EXIT_IO
_LIBC = ctypes.util.find_library("c") or "libc.so.6"
# The same libc ioctl as pykvm.ioctl.call.raw_ioctl, but without argtypes: ctypes
# converts a Python int to a C int itself, which is cheaper than the argtypes
# converters (c_int, c_ulong, c_void_p) run on every call.
plain_ioctl = ctypes.CDLL(_LIBC, use_errno=True).ioctl
plain_ioctl.restype = ctypes.c_int

# kvm_run.exit_reason (offset 8) and kvm_run.io (offset 32) in one unpack.
_EXIT_AND_IO = struct.Struct("<I20xBBHIQ")


# --- loops that do less than pykvm (what each ingredient costs) -----------------------------
class DispatchOnly(Vcpu):
    """ioctl (pykvm's ctypes call), decode the port, bus lookup, device call.
    No statistics, no timing: the floor of a Python VMM with this call style.
    (Kicks are served as in pykvm: the idle monitor, seeing no exits counted,
    kicks the vCPU once a second.)"""

    def run_loop(self):
        vm, fd, buf, run = self.vm, self.fd, self._run_map, k.raw_ioctl
        ports = vm.pio_bus.ports
        unpack_io = _IO.unpack_from
        while not vm.stop_requested:
            if run(fd, KVM_RUN, None) < 0:
                self._interrupted(ctypes.get_errno())
                continue
            direction, size, port, count, data_offset = unpack_io(buf, _EXIT_OFFSET)
            device, offset = ports[port]
            device.write(offset, size, buf[data_offset])

    def _interrupted(self, err: int) -> None:
        if err not in (errno.EINTR, errno.EAGAIN):
            raise KvmError("KVM_RUN", err)
        self._run_map[_IMMEDIATE_EXIT_OFFSET] = 0
        self._serve_requests()
        self.vm.wait_while_paused(self)


class DispatchOnlyPlain(DispatchOnly):
    """DispatchOnly with the ctypes ioctl called without argtypes."""

    def run_loop(self):
        vm, fd, buf, run = self.vm, self.fd, self._run_map, plain_ioctl
        ports = vm.pio_bus.ports
        unpack_io = _IO.unpack_from
        while not vm.stop_requested:
            if run(fd, KVM_RUN, 0) < 0:
                self._interrupted(ctypes.get_errno())
                continue
            direction, size, port, count, data_offset = unpack_io(buf, _EXIT_OFFSET)
            device, offset = ports[port]
            device.write(offset, size, buf[data_offset])


class DispatchOnlyFcntl(DispatchOnly):
    """DispatchOnly with fcntl.ioctl (a C builtin, releases the GIL). Python >= 3.14
    retries ioctl on EINTR, which would swallow pykvm's kicks (see ProposedFcntl)."""

    def run_loop(self):
        vm, fd, buf, run = self.vm, self.fd, self._run_map, fcntl.ioctl
        ports = vm.pio_bus.ports
        unpack_io = _IO.unpack_from
        while not vm.stop_requested:
            try:
                run(fd, KVM_RUN)
            except OSError as error:
                self._interrupted(error.errno)
                continue
            direction, size, port, count, data_offset = unpack_io(buf, _EXIT_OFFSET)
            device, offset = ports[port]
            device.write(offset, size, buf[data_offset])


NO_TIMING = (("drop", "t0 = clock()"), ("drop", "t1 = clock()"),
             ("drop", "stats.guest_ns += t1 - t0"), ("drop", "stats.handler_ns += clock() - t1"),
             ("sub", "trace.pio(self, t0, t1, clock(),", "trace.pio(self, 0, 0, 0,"))
NO_STATS = (("drop", "exits[reason] += 1"), ("drop", "device_counts[device.name] += 1"),
            ("drop", 'pio_counts[(port, "out" if direction else "in")] += 1'))
PLAIN_CALL = (("sub", "run_ioctl = k.raw_ioctl", "run_ioctl = plain_ioctl"),
              ("sub", "run_ioctl(fd, request_run, None)", "run_ioctl(fd, request_run, 0)"))


class Proposed(Vcpu):
    """The run loop proposed for pykvm/vcpu.py: same behaviour, statistics and
    tracing as the current one (exit counts, per-port and per-device counts,
    guest and handler time), cheaper per exit:
      1. KVM_RUN through a ctypes function without argtypes (plain_ioctl), or
         (ProposedFcntl) through fcntl.ioctl(fd, KVM_RUN) on Python < 3.14;
      2. two clock reads per exit instead of three: the read before KVM_RUN also
         ends the previous exit's handler time; both times are kept in locals and
         added to stats on every exit that leaves the fast path and at the end;
      3. exit_reason and kvm_run.io decoded by one struct unpack;
      4. the data of an `out` read with mmap indexing (1 byte) or a per-size struct,
         not int.from_bytes of a slice; an `in` stored with a per-size struct."""

    def run_loop(self) -> None:
        vm = self.vm
        fd = self.fd
        run_ioctl = plain_ioctl
        request_run = KVM_RUN
        buf = self._run_map
        unpack_exit = _EXIT_AND_IO.unpack_from
        unpack_data = _DATA_UNPACK
        pack_data = _DATA_PACK
        pio = vm.pio_bus
        clock = time.perf_counter_ns
        stats = self.stats
        exits = stats.exits
        pio_counts = stats.pio
        device_counts = stats.devices
        exit_io = KVM_EXIT_IO
        trace = vm.tracer
        guest_ns = handler_ns = 0
        t1 = clock()
        try:
            while not vm.stop_requested:
                t0 = clock()
                handler_ns += t0 - t1
                try:
                    rc = run_ioctl(fd, request_run, 0)
                except OSError as error:  # fcntl.ioctl raises; ctypes returns -1
                    rc, err = -1, error.errno
                else:
                    err = 0 if rc >= 0 else ctypes.get_errno()
                t1 = clock()
                guest_ns += t1 - t0
                if rc < 0:
                    stats.guest_ns += guest_ns
                    stats.handler_ns += handler_ns
                    guest_ns = handler_ns = 0
                    if err not in (errno.EINTR, errno.EAGAIN):
                        raise KvmError("KVM_RUN", err)
                    buf[_IMMEDIATE_EXIT_OFFSET] = 0
                    self._serve_requests()
                    vm.wait_while_paused(self)
                    continue
                reason, direction, size, port, count, data_offset = unpack_exit(buf, 8)
                exits[reason] += 1
                if reason == exit_io:
                    entry = pio.ports.get(port)
                    if entry is not None and count == 1:
                        device, offset = entry
                        if direction:  # out
                            value = buf[data_offset] if size == 1 \
                                else unpack_data[size](buf, data_offset)[0]
                            device.write(offset, size, value)
                        else:
                            value = device.read(offset, size) & ((1 << (8 * size)) - 1)
                            pack_data[size](buf, data_offset, value)
                        device_counts[device.name] += 1
                    else:
                        value = self._string_io(direction, size, port, count, data_offset, entry)
                    pio_counts[(port, "out" if direction else "in")] += 1
                    if trace is not None:
                        trace.pio(self, t0, t1, clock(), port, size, direction, count, value,
                                  entry[0].name if entry else None)
                else:
                    stats.guest_ns += guest_ns
                    stats.handler_ns += handler_ns
                    guest_ns = handler_ns = 0
                    self._handle_exit(reason, t0, t1)
        finally:
            stats.guest_ns += guest_ns
            stats.handler_ns += handler_ns + (clock() - t1)


_DATA_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_DATA_UNPACK = {size: struct.Struct(f).unpack_from for size, f in _DATA_FORMATS.items()}
_DATA_PACK = {size: struct.Struct(f).pack_into for size, f in _DATA_FORMATS.items()}


def _edited(base: type, name: str, doc: str, *edits: tuple[str, ...]) -> type:
    """A Vcpu subclass whose run_loop is ``base.run_loop`` with edits applied, so
    that a variant measures exactly that loop minus or plus one thing. An edit is
    ("drop", line) -- remove every line that reads so, indentation aside -- or
    ("sub", old, new) -- replace text."""
    import inspect
    import textwrap

    import pykvm.vcpu as vcpu_module
    source = getattr(base, "_loop_source", None) \
        or textwrap.dedent(inspect.getsource(base.run_loop))
    for edit in edits:
        if edit[0] == "drop":
            lines = source.splitlines(keepends=True)
            kept = [line for line in lines if line.strip() != edit[1]]
            found, source = len(kept) < len(lines), "".join(kept)
        else:
            found, source = edit[1] in source, source.replace(edit[1], edit[2])
        if not found:
            raise RuntimeError(f"{name}: {edit[1]!r} is no longer in {base.__name__}.run_loop; "
                               f"update bench/profile_exits.py")
    namespace = {**vars(vcpu_module), **globals()}
    exec(compile(source, f"<{name}>", "exec"), namespace)
    return type(name, (Vcpu,), {"run_loop": namespace["run_loop"], "__doc__": doc,
                                "_loop_source": source})


# fcntl.ioctl(fd, KVM_RUN): a C builtin that releases the GIL like ctypes, with less
# work per call. Python 3.14 made it retry on EINTR, which would turn a kick
# (immediate_exit + signal) into an endless retry: only for Python < 3.14.
ProposedFcntl = _edited(
    Proposed, "ProposedFcntl", "Proposed with fcntl.ioctl (Python < 3.14)",
    ("sub", "run_ioctl = plain_ioctl", "run_ioctl = fcntl.ioctl"),
    ("sub", "rc = run_ioctl(fd, request_run, 0)", "rc = run_ioctl(fd, request_run)"))

# What the statistics cost in the proposed loop: the two counters the stats.py
# format needs per exit (per-port (port, direction) tuples, per-device names)
# replaced by one list index, port << 1 | direction (devices derivable at report time).
_PORT_COUNTS = [0] * (1 << 17)
ProposedFcntlLeanStats = _edited(
    ProposedFcntl, "ProposedFcntlLeanStats", "ProposedFcntl with per-port counts in a list",
    ("drop", "device_counts[device.name] += 1"),
    ("sub", 'pio_counts[(port, "out" if direction else "in")] += 1',
     "port_counts[port << 1 | direction] += 1"),
    ("sub", "pio_counts = stats.pio", "port_counts = _PORT_COUNTS"))
ProposedFcntlNoTiming = _edited(
    ProposedFcntl, "ProposedFcntlNoTiming", "ProposedFcntl without per-exit clocks",
    ("sub", "guest_ns = handler_ns = 0\n    t1 = clock()", "guest_ns = handler_ns = t0 = t1 = 0"),
    ("drop", "t0 = clock()"), ("drop", "t1 = clock()"), ("drop", "handler_ns += t0 - t1"),
    ("drop", "guest_ns += t1 - t0"),
    ("sub", "handler_ns + (clock() - t1)", "handler_ns"))

ProposedFcntlNoTimingLeanStats = _edited(
    ProposedFcntlNoTiming, "ProposedFcntlNoTimingLeanStats",
    "ProposedFcntl without per-exit clocks, per-port counts in a list",
    ("drop", "device_counts[device.name] += 1"),
    ("sub", 'pio_counts[(port, "out" if direction else "in")] += 1',
     "port_counts[port << 1 | direction] += 1"),
    ("sub", "pio_counts = stats.pio", "port_counts = _PORT_COUNTS"))

# The least a loop with exact counts can do: as the one above, and the bus's port
# dictionary's get bound once (pykvm's PioBus swaps the dict on every register, so
# this needs PioBus to update it in place instead).
ProposedMinimal = _edited(
    ProposedFcntlNoTimingLeanStats, "ProposedMinimal",
    "ProposedFcntlNoTimingLeanStats with ports.get bound once",
    ("sub", "pio = vm.pio_bus", "ports_get = vm.pio_bus.ports.get"),
    ("sub", "entry = pio.ports.get(port)", "entry = ports_get(port)"))


VARIANTS: dict[str, type | None] = {
    "current": None,  # pykvm's Vcpu as it is: what bench/exits.py measures
    "dispatch-only": DispatchOnly,
    "dispatch-only, plain ctypes": DispatchOnlyPlain,
    "dispatch-only, fcntl.ioctl": DispatchOnlyFcntl,
    "current, plain ctypes": _edited(Vcpu, "PlainCall", "current loop, ioctl without argtypes",
                                     *PLAIN_CALL),
    "current - timing": _edited(Vcpu, "NoTiming", "current loop without per-exit clocks",
                                *NO_TIMING),
    "current - stats": _edited(Vcpu, "NoStats", "current loop without per-exit counters",
                               *NO_STATS),
    "current - timing - stats": _edited(Vcpu, "NoTimingNoStats",
                                        "current loop, no clocks, no counters",
                                        *NO_TIMING, *NO_STATS),
    "proposed": Proposed,
    "proposed, fcntl": ProposedFcntl,
    "proposed, fcntl, lean stats": ProposedFcntlLeanStats,
    "proposed, fcntl, no timing": ProposedFcntlNoTiming,
    "proposed, fcntl, no timing, lean": ProposedFcntlNoTimingLeanStats,
    "minimal with exact counts": ProposedMinimal,
}


def profile(variants: list[str], rounds: int, count: int, raw: Path | None = None,
            wall: bool = False, ring: int = 0) -> None:
    with bench.Kvm() as kvm, tempfile.TemporaryDirectory(prefix="pykvm-prof-") as tmp:
        setup = bench.Setup(Path(tmp), ring, count)
        bench.run_c(setup.c_binary, setup.image_path, count)  # warm-up
        pairs: dict[str, list[tuple[float, float]]] = {}
        for name in variants:
            bench.run_pykvm(kvm, setup.image, count, VARIANTS[name])  # warm-up, checks it works
            pairs[name] = []
        for i in range(rounds):
            # A C run next to every variant run: each pair shares the host's mood.
            for name in variants:
                c = bench.run_c(setup.c_binary, setup.image_path, count)
                p = bench.run_pykvm(kvm, setup.image, count, VARIANTS[name])
                pairs[name].append((c.cpu, p.cpu, c.wall, p.wall))
            print(f"round {i + 1}/{rounds} done", file=sys.stderr)
        host_kind = kvm.host_kind
    if raw is not None:
        raw.write_text(json.dumps({"host_kind": host_kind, "exits": count, "ring": ring,
                                   "pairs": pairs}))
    report(host_kind, count, rounds, pairs, wall, ring)


def report(host_kind: str, count: int, rounds: int, pairs: dict, wall: bool = False,
           ring: int = 0) -> None:
    """Per variant, of its µs per exit (process CPU time, or wall time): min, median,
    and two ratios: the median over all pairs of (variant run / the C run next to
    it), and the same over the quiet pairs only -- those whose C run was within
    QUIET of the fastest C run (a busy shared host slows everything, but not
    evenly: quiet pairs show best what the loops cost)."""
    pick = (lambda run: (run[2], run[3])) if wall else (lambda run: (run[0], run[1]))
    pairs = {name: [pick(run) for run in runs] for name, runs in pairs.items()}
    all_c = [c for runs in pairs.values() for c, _ in runs]
    c_min = min(all_c)
    print(f"host kind: {host_kind}; guest ring {ring}; {count} exits per run, {rounds} rounds; "
          f"{'wall' if wall else 'process CPU'} time; "
          f"C: min {c_min:.2f} µs, median {statistics.median(all_c):.2f} µs")
    print(f"{'loop':<30}{'min µs':>8}{'median':>8}{'min-Cmin':>10}{'ratio':>7}"
          f"{'quiet ratio':>13}")
    for name, runs in pairs.items():
        values = [p for _, p in runs]
        ratios = [p / c for c, p in runs]
        quiet = [p / c for c, p in runs if c <= c_min * QUIET]
        quiet_text = f"{statistics.median(quiet):.3f} ({len(quiet)})" if quiet else "-"
        print(f"{name:<30}{min(values):>8.2f}{statistics.median(values):>8.2f}"
              f"{min(values) - c_min:>10.2f}{statistics.median(ratios):>7.3f}{quiet_text:>13}")
    print(f"ratio: median of (run / C run next to it); quiet: the same over pairs whose C run "
          f"was within {100 * (QUIET - 1):.0f}% of the fastest (count in brackets)")


QUIET = 1.15


def micro() -> None:
    """Per-operation costs of the run loop's ingredients (timeit, no guest)."""
    import mmap
    from collections import defaultdict

    kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    buf = mmap.mmap(-1, 4096)
    buf[8:12] = (2).to_bytes(4, "little")
    buf[32:48] = _IO.pack(1, 1, 0x80, 1, 0x1000 - 64)
    raw = k.raw_ioctl
    check = k.KVM_CHECK_EXTENSION

    class Dev:
        name = "dev"
        count = 0

        def write(self, offset, size, value):
            self.count += 1

    env = {"buf": buf, "fd": kvm_fd, "raw": raw, "plain": plain_ioctl, "req": check,
           "ioctl": fcntl.ioctl, "clock": time.perf_counter_ns, "getppid": os.getppid,
           "R": _EXIT_REASON.unpack_from, "IO": _IO.unpack_from, "ALL": _EXIT_AND_IO.unpack_from,
           "U1": _DATA_UNPACK[1], "dd": defaultdict(int), "lst": [0] * 64, "dev": Dev(),
           "big": [0] * (1 << 17), "ports": {0x80: (Dev(), 0)}}
    tests = [
        ("os.getppid() (a bare system call, for scale)", "getppid()"),
        ("ioctl via pykvm raw_ioctl (ctypes, argtypes)", "raw(fd, req, None)"),
        ("ioctl via ctypes without argtypes", "plain(fd, req, 0)"),
        ("ioctl via fcntl.ioctl(fd, req)", "ioctl(fd, req)"),
        ("ioctl via fcntl.ioctl(fd, req, 0) (int arg: slow path)", "ioctl(fd, req, 0)"),
        ("time.perf_counter_ns()", "clock()"),
        ("unpack exit_reason", "R(buf, 8)[0]"),
        ("unpack kvm_run.io", "IO(buf, 32)"),
        ("unpack exit_reason + io at once", "ALL(buf, 8)"),
        ("int.from_bytes(buf[a:a+1], 'little')", "int.from_bytes(buf[4032:4033], 'little')"),
        ("struct unpack_from <B", "U1(buf, 4032)[0]"),
        ("buf[a] (mmap index, 1 byte)", "buf[4032]"),
        ("ports.get(port)", "ports.get(0x80)"),
        ("exits[reason] += 1 (list)", "lst[2] += 1"),
        ("pio[(port, 'out' if d else 'in')] += 1", "dd[(0x80, 'out' if 1 else 'in')] += 1"),
        ("port_counts[port << 1 | d] += 1 (list)", "big[0x80 << 1 | 1] += 1"),
        ("devices[device.name] += 1", "dd[dev.name] += 1"),
        ("device.write(offset, size, value)", "dev.write(0, 1, 42)"),
    ]
    try:
        for label, statement in tests:
            n = 100000
            best = min(timeit.repeat(statement, globals=env, number=n, repeat=5)) / n * 1e9
            print(f"{label:<58}{best:>8.0f} ns")
    finally:
        os.close(kvm_fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--variants", nargs="+", choices=list(VARIANTS),
                        default=list(VARIANTS), metavar="NAME",
                        help=f"loops to measure (default all: {', '.join(VARIANTS)})")
    parser.add_argument("-r", "--rounds", type=int, default=15)
    parser.add_argument("-n", "--exits", type=int, default=5000)
    parser.add_argument("--ring", type=int, choices=(0, 3), default=0,
                        help="ring of the guest's loop (as bench/exits.py --ring)")
    parser.add_argument("--micro", action="store_true", help="per-operation costs only")
    parser.add_argument("--raw", type=Path, help="also write every (C, variant) pair to this JSON file")
    parser.add_argument("--wall", action="store_true",
                        help="rank by wall time instead of process CPU time")
    parser.add_argument("--report", type=Path, metavar="RAW",
                        help="print the table of a --raw file again (no measuring)")
    args = parser.parse_args()
    if args.micro:
        micro()
    elif args.report:
        data = json.loads(args.report.read_text())
        rounds = max(len(runs) for runs in data["pairs"].values())
        report(data["host_kind"], data["exits"], rounds, data["pairs"], args.wall,
               data.get("ring", 0))
    else:
        profile(args.variants, args.rounds, args.exits, args.raw, args.wall, args.ring)
    return 0


if __name__ == "__main__":
    sys.exit(main())
