#!/usr/bin/env python3
"""What one completed instruction costs: pykvm finishing an instruction kvm_pvm's
emulator refused (pykvm/quirks/complete.py), against a port-I/O exit in the same run.

A flat ring-0 guest (bench/guests/complete_loop.S) runs N iterations of one
instruction: `out` (a port-I/O exit to pykvm, the reference), `fwait` (completed as
a no-op: the cost of the emulation-failure exit, the decode and the table lookup),
`ldmxcsr` / `stmxcsr` (plus the operand's page walk and KVM_GET/SET_XSAVE). The
vCPU runs as in `pykvm run` (its thread, its seccomp filter). Rounds are
interleaved so host noise hits every variant; the table gives the median µs per
iteration (wall, from the guest's `out` to port 0x81 before the loop to the exit port) and its ratio to `out`.
The last line, ``ratio: X``, is ldmxcsr's. On VT-x/AMD-V the completed instructions
run natively and the ratios fall below 1.

    python3 bench/completions.py            # 3 rounds of 5000 iterations each
    python3 bench/completions.py --quick    # 200 iterations, 1 round: does it work?
    python3 bench/completions.py --record   # also add a row to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pykvm import layout  # noqa: E402
from pykvm.boot.modes import set_mode  # noqa: E402
from pykvm.bus import Device  # noqa: E402
from pykvm.kvm import Kvm  # noqa: E402
from pykvm.memory import GuestMemory  # noqa: E402
from pykvm.vstate.vm import Vm  # noqa: E402

from flatguest import BenchError, assemble  # noqa: E402
from results import add_rows  # noqa: E402

SOURCE = BENCH / "guests" / "complete_loop.S"
VARIANTS = ("OUT", "FWAIT", "LDMXCSR", "STMXCSR")
COUNT_OFFSET = 8
LOOP_PORT = 0x80
MARKER = "<!-- completions.py --record adds rows above this line -->\n"


class Clock(Device):
    """Port 0x81 starts the clock, the exit port stops it (and the VM); 0x80 is the loop's."""

    name = "bench-clock"

    def __init__(self, vm):
        self.vm = vm
        self.started = self.stopped = 0.0

    def write(self, offset, size, value):
        now = time.perf_counter()
        if offset == 1:
            self.started = now
        elif offset == layout.EXIT_PORT - LOOP_PORT:
            self.stopped = now
            self.vm.request_stop("exit", value & 0xFF, "bench done")


def build(variant: str, workdir: Path) -> bytes:
    source = workdir / f"{variant}.S"
    source.write_text(f".set {variant}, 1\n" + SOURCE.read_text())
    return assemble(source, workdir, layout.FLAT_LOAD_ADDR)


def run_once(kvm: Kvm, binary: bytes, count: int) -> tuple[float, str, int]:
    """(wall seconds of the loop, host kind, instructions pykvm completed)."""
    with GuestMemory.anonymous(4 << 20) as memory, Vm(kvm, memory) as vm:
        clock = Clock(vm)
        vm.add_pio_device(LOOP_PORT, layout.EXIT_PORT - LOOP_PORT + 1, clock)
        memory.write(layout.FLAT_LOAD_ADDR, binary)
        memory.write_u64(layout.FLAT_LOAD_ADDR + COUNT_OFFSET, count)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, "long", layout.FLAT_LOAD_ADDR)
        stop = vm.run(timeout=600)
        if stop is None or (stop.kind, stop.status) != ("exit", 0) or not clock.started:
            raise BenchError(f"the guest did not finish: {stop}")
        return clock.stopped - clock.started, vm.quirks.name, \
            sum(vm.vcpus[0].stats.quirks.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=5000, help="iterations per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 iterations, 1 round")
    parser.add_argument("--record", action="store_true", help="add a row to bench/RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.n, args.rounds = 200, 1
    load = os.getloadavg()[0]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, Kvm() as kvm:
        binaries = {v: build(v, Path(tmp)) for v in VARIANTS}
        for variant in VARIANTS:   # untimed: the first completion waits for the sandbox's
            run_once(kvm, binaries[variant], 10)   # background imports (one-time start-up)
        for _ in range(args.rounds):
            for variant in VARIANTS:
                seconds, host, completed = run_once(kvm, binaries[variant], args.n)
                if host == "kvm_pvm" and completed != (0 if variant == "OUT" else args.n):
                    raise BenchError(f"{variant}: {completed} completions, expected {args.n}")
                times[variant].append(seconds / args.n * 1e6)
    us = {v: statistics.median(t) for v, t in times.items()}
    print(f"host kind {host}, load {load:.1f}, {args.n} iterations x {args.rounds} rounds")
    for variant in VARIANTS:
        print(f"  {variant.lower():<8} {us[variant]:8.1f} us/iteration  "
              f"ratio to out {us[variant] / us['OUT']:.2f}")
    print(f"ratio: {us['LDMXCSR'] / us['OUT']:.2f}")
    if args.record:
        cells = " | ".join(f"{us[v]:.1f} ({us[v] / us['OUT']:.2f})" for v in VARIANTS[1:])
        add_rows(MARKER, f"| {datetime.date.today()} | {host} | {us['OUT']:.1f} | {cells} | "
                         f"{load:.1f} | {args.n} × {args.rounds} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
