#!/usr/bin/env python3
"""The port-I/O exit round trip: pykvm's full dispatch against a C reference.

The same guest (bench/guests/exit_loop.S: N `out %al, $0x80` in a loop, then a
write to pykvm's exit port 0xF4) runs in two VMMs:

- C (bench/c/exit_loop.c, built here with gcc): the raw ioctls, a KVM_RUN loop
  that reads the port and the byte, counts, and enters again;
- pykvm: a real Vm, a real Device on the PIO bus, Vcpu.run_loop on its vCPU
  thread, i.e. the whole dispatch: exit-reason and kvm_run.io decoding, bus
  lookup, the device call, per-exit statistics and timing.

Each side reads two clocks at the first exit on port 0x80 and at the exit-port
write: N round trips, set-up and the guest's ring-0 prologue excluded. The
monotonic clock gives wall time; the process CPU-time clock gives the CPU time
the VMM process used (guest time included, as KVM accounts it to the thread in
KVM_RUN), which leaves out the time other processes had the CPU -- on a shared,
busy host wall time can double while CPU time stays put. On a quiet host the two
agree. Rounds are interleaved (C, pykvm, C, pykvm, ...) so host noise hits both;
the table gives median, min, max and spread of µs per exit, and the last line is
``ratio: X`` = median pykvm CPU µs/exit / median C CPU µs/exit.

    python3 bench/exits.py            # 5 rounds of 20000 exits each side
    python3 bench/exits.py --quick    # a tiny run: checks that everything works
    python3 bench/exits.py --ring 3   # the guest's loop in ring 3 (see exit_loop.S)
    python3 bench/exits.py --record   # also add a row to bench/RESULTS.md
    python3 bench/exits.py --seccomp  # pykvm with and without its seccomp filter (pykvm/sandbox)

pykvm's side runs as `pykvm run` does: its vCPU thread under the seccomp filter.
``--seccomp`` interleaves a third side, pykvm with the filter off, and prints the
filter's cost per exit (``--record`` then adds a row to the seccomp table).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
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

from pykvm import layout, sandbox  # noqa: E402
from pykvm.boot.modes import set_mode  # noqa: E402
from pykvm.bus import Device  # noqa: E402
from pykvm.kvm import Kvm  # noqa: E402
from pykvm.memory import GuestMemory  # noqa: E402
from pykvm.vstate.vm import Vm  # noqa: E402

GUEST_SOURCE = BENCH / "guests" / "exit_loop.S"
C_SOURCE = BENCH / "c" / "exit_loop.c"
RESULTS = BENCH / "RESULTS.md"

PORT = 0x80                      # the measured port (the PC's POST port; no in-kernel device owns it)
EXIT_PORT = layout.EXIT_PORT     # 0xF4: the guest's last write
LOAD_ADDR = layout.FLAT_LOAD_ADDR
MEM_SIZE = 2 * layout.MiB        # the guest maps (and needs) only the first 2 MiB
COUNT_OFFSET = 8                 # the guest's `count` quadword


class BenchError(Exception):
    pass


# --- building the guest and the C reference -----------------------------------------------
def assemble_guest(workdir: Path, ring: int) -> bytes:
    """exit_loop.S -> flat binary linked at LOAD_ADDR (GNU as and ld)."""
    obj, out = workdir / f"exit_loop{ring}.o", workdir / f"exit_loop{ring}.bin"
    run_tool(["as", "--64", f"--defsym=PORT={PORT:#x}", f"--defsym=RING={ring}",
              "-o", str(obj), str(GUEST_SOURCE)])
    run_tool(["ld", "-m", "elf_x86_64", f"-Ttext={LOAD_ADDR:#x}", "--oformat", "binary",
              "-o", str(out), str(obj)])
    return out.read_bytes()


def build_c(workdir: Path) -> Path:
    binary = workdir / "exit_loop"
    run_tool([os.environ.get("CC", "gcc"), "-O2", "-Wall", "-o", str(binary), str(C_SOURCE)])
    return binary


def run_tool(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise BenchError(f"{argv[0]} is not installed (the bench builds its guest and C "
                         f"reference at run time: apt-get install binutils gcc)")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")


def with_count(image: bytes, count: int) -> bytes:
    patched = bytearray(image)
    patched[COUNT_OFFSET:COUNT_OFFSET + 8] = count.to_bytes(8, "little")
    return bytes(patched)


# --- one round of each side ------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    wall: float   # µs per exit, monotonic clock
    cpu: float    # µs per exit, process CPU time


def run_c(binary: Path, image_path: Path, count: int) -> Run:
    """One C run."""
    done = subprocess.run([str(binary), str(image_path), hex(LOAD_ADDR), hex(MEM_SIZE),
                           hex(PORT), hex(EXIT_PORT)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise BenchError(f"C reference failed: {done.stderr.strip()}")
    fields = {key: int(value) for key, value in
              (item.split("=") for item in done.stdout.split())}
    if fields["exits"] != count:
        raise BenchError(f"C reference saw {fields['exits']} exits on port {PORT:#x}, "
                         f"expected {count}")
    return Run(fields["ns"] / count / 1000, fields["cpu_ns"] / count / 1000)


class CountingPort(Device):
    """The measured device: counts writes, keeps the last value, notes when the first came."""

    name = "bench-port"

    def __init__(self):
        self.count = 0
        self.value = 0
        self.first_ns = self.first_cpu_ns = 0

    def write(self, offset: int, size: int, value: int) -> None:
        if not self.count:
            self.first_ns = time.perf_counter_ns()
            self.first_cpu_ns = time.process_time_ns()
        self.count += 1
        self.value = value


class FinishPort(Device):
    """pykvm's exit port for this guest: note the time, stop the VM."""

    name = "exit"

    def __init__(self, vm: Vm):
        self.vm = vm
        self.done_ns = self.done_cpu_ns = 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.done_ns = time.perf_counter_ns()
        self.done_cpu_ns = time.process_time_ns()
        self.vm.request_stop("exit", value, f"guest exited with status {value}")


def run_pykvm(kvm: Kvm, image: bytes, count: int, vcpu_class=None, timing: bool = False) -> Run:
    """One pykvm run, as `pykvm run` does it without --stats (no per-exit clock
    reads; ``timing=True`` measures the --stats path). ``vcpu_class`` swaps the
    Vcpu's run loop, to measure a candidate loop."""
    with GuestMemory.anonymous(MEM_SIZE) as memory, \
            Vm(kvm, memory, timing=timing) as vm:
        port, finish = CountingPort(), FinishPort(vm)
        vm.add_pio_device(PORT, 1, port)
        vm.add_pio_device(EXIT_PORT, 1, finish)
        memory.write(LOAD_ADDR, image)
        vm.create_vcpus(1)
        vcpu = vm.vcpus[0]
        if vcpu_class is not None:
            vcpu.__class__ = vcpu_class
        set_mode(vcpu, memory, "long", LOAD_ADDR)
        stop = vm.run(timeout=300)
        if stop is None or stop.kind != "exit" or stop.status != 0:
            raise BenchError(f"pykvm run did not end at the exit port: {stop}")
        if port.count != count:
            raise BenchError(f"pykvm saw {port.count} exits on port {PORT:#x}, expected {count}")
        return Run((finish.done_ns - port.first_ns) / count / 1000,
                   (finish.done_cpu_ns - port.first_cpu_ns) / count / 1000)


# --- the bench ---------------------------------------------------------------------------------
class Setup:
    """The guest image (with N patched in) and the C binary, in a temporary directory."""

    def __init__(self, workdir: Path, ring: int, count: int):
        self.count = count
        self.image = with_count(assemble_guest(workdir, ring), count)
        self.image_path = workdir / "guest.bin"
        self.image_path.write_bytes(self.image)
        self.c_binary = build_c(workdir)


def run_unfiltered(kvm: Kvm, image: bytes, count: int) -> Run:
    """One pykvm run with the seccomp filter off (the vCPU thread starts unconfined)."""
    sandbox.configure(enabled=False)
    try:
        return run_pykvm(kvm, image, count)
    finally:
        sandbox.configure(enabled=True)


def measure(kvm: Kvm, setup: Setup, rounds: int, warmup: bool = True,
            progress=None, unfiltered: list[Run] | None = None) -> tuple[list[Run], list[Run]]:
    """C and pykvm rounds, interleaved; with ``unfiltered`` (a list), a round of pykvm
    without its seccomp filter after each pair, appended there."""
    if warmup:  # page in both paths, discard
        run_c(setup.c_binary, setup.image_path, setup.count)
        run_pykvm(kvm, setup.image, setup.count)
    c_runs, py_runs = [], []
    for i in range(rounds):
        c_runs.append(run_c(setup.c_binary, setup.image_path, setup.count))
        py_runs.append(run_pykvm(kvm, setup.image, setup.count))
        if unfiltered is not None:
            unfiltered.append(run_unfiltered(kvm, setup.image, setup.count))
        if progress:
            progress(f"round {i + 1}/{rounds}: C {c_runs[-1].cpu:.2f} µs CPU, "
                     f"{c_runs[-1].wall:.2f} µs wall; pykvm {py_runs[-1].cpu:.2f} µs CPU, "
                     f"{py_runs[-1].wall:.2f} µs wall")
    return c_runs, py_runs


def describe(values: list[float]) -> str:
    """median, min, max, and the spread (max - min) / median."""
    median = statistics.median(values)
    spread = 100 * (max(values) - min(values)) / median
    return f"{median:>8.2f}{min(values):>8.2f}{max(values):>8.2f}{spread:>7.0f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", "-n", type=int, default=20000, help="exits per round (20000)")
    parser.add_argument("--rounds", "-r", type=int, default=5, help="rounds of each side (5)")
    parser.add_argument("--ring", type=int, choices=(0, 3), default=0,
                        help="ring the guest's loop runs in (0; see bench/guests/exit_loop.S)")
    parser.add_argument("--quick", action="store_true",
                        help="200 exits, 1 round, no warm-up: checks that the bench works")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    parser.add_argument("--seccomp", action="store_true",
                        help="also run pykvm without its seccomp filter, interleaved")
    args = parser.parse_args(argv)
    if args.quick:
        args.exits, args.rounds = 200, 1
    if args.exits < 1 or args.rounds < 1:
        parser.error("--exits and --rounds must be at least 1")

    try:
        with Kvm() as kvm, tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
            setup = Setup(Path(tmp), args.ring, args.exits)
            progress = None if args.quick else (lambda line: print(line, file=sys.stderr))
            load_before = os.getloadavg()[0]
            unfiltered = [] if args.seccomp else None
            c_runs, py_runs = measure(kvm, setup, args.rounds, warmup=not args.quick,
                                      progress=progress, unfiltered=unfiltered)
            host_kind = kvm.host_kind
    except BenchError as error:
        print(f"exits: {error}", file=sys.stderr)
        return 1

    c_cpu = statistics.median(r.cpu for r in c_runs)
    p_cpu = statistics.median(r.cpu for r in py_runs)
    c_wall = statistics.median(r.wall for r in c_runs)
    p_wall = statistics.median(r.wall for r in py_runs)
    ratio = p_cpu / c_cpu
    print(f"port-I/O exit round trip: `out %al, ${PORT:#x}` loop in guest ring {args.ring}, "
          f"long mode")
    print(f"host kind: {host_kind}   exits per round: {args.exits}   rounds: {args.rounds} "
          f"each, interleaved   load average: {load_before:.2f}")
    print(f"{'µs per exit':<14}{'CPU time: median':>17}{'min':>8}{'max':>8}{'spread':>8}"
          f"{'wall: median':>16}{'min':>8}{'max':>8}{'spread':>8}")
    for name, runs in (("C reference", c_runs), ("pykvm", py_runs)):
        print(f"{name:<14}         {describe([r.cpu for r in runs])}"
              f"        {describe([r.wall for r in runs])}")
    print(f"pykvm overhead per exit: {p_cpu - c_cpu:.2f} µs CPU, {p_wall - c_wall:.2f} µs wall "
          f"(medians); wall-time ratio {p_wall / c_wall:.3f}")
    if unfiltered:
        u_cpu = statistics.median(r.cpu for r in unfiltered)
        u_wall = statistics.median(r.wall for r in unfiltered)
        print(f"{'no seccomp':<14}         {describe([r.cpu for r in unfiltered])}"
              f"        {describe([r.wall for r in unfiltered])}")
        print(f"seccomp filter cost per exit: {p_cpu - u_cpu:+.2f} µs CPU, "
              f"{p_wall - u_wall:+.2f} µs wall (medians, filter on - off); "
              f"ratio on/off {p_cpu / u_cpu:.3f}")
    if args.record:
        record(host_kind, args, c_cpu, p_cpu, ratio, c_wall, p_wall, load_before)
        if unfiltered:
            record_seccomp(host_kind, args, c_cpu, p_cpu, u_cpu, load_before)
    print(f"ratio: {ratio:.3f}")
    return 0


ROWS_MARKER = "<!-- exits.py --record adds rows above this line -->"


def record(host_kind: str, args, c_cpu: float, p_cpu: float, ratio: float,
           c_wall: float, p_wall: float, load: float) -> None:
    """Add one row to the exits table in bench/RESULTS.md (above ROWS_MARKER)."""
    row = (f"| {datetime.date.today().isoformat()} | {host_kind} | {args.ring} | {c_cpu:.2f} | "
           f"{p_cpu:.2f} | {ratio:.3f} | {c_wall:.2f} / {p_wall:.2f} | {load:.1f} | "
           f"{args.exits} × {args.rounds} |\n")
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if ROWS_MARKER in text:
        text = text.replace(ROWS_MARKER, row + ROWS_MARKER, 1)
    else:
        text += ("" if not text or text.endswith("\n") else "\n") + row
    RESULTS.write_text(text)


SECCOMP_MARKER = "<!-- exits.py --seccomp --record adds rows above this line -->"


def record_seccomp(host_kind: str, args, c_cpu: float, p_cpu: float, u_cpu: float,
                   load: float) -> None:
    """Add one row to the seccomp table in bench/RESULTS.md (above SECCOMP_MARKER)."""
    row = (f"| {datetime.date.today().isoformat()} | {host_kind} | {args.ring} | {c_cpu:.2f} | "
           f"{u_cpu:.2f} | {p_cpu:.2f} | {p_cpu - u_cpu:+.2f} | {p_cpu / u_cpu:.3f} | "
           f"{load:.1f} | {args.exits} × {args.rounds} |\n")
    text = RESULTS.read_text()
    if SECCOMP_MARKER not in text:
        raise BenchError(f"{RESULTS} has no seccomp table ({SECCOMP_MARKER})")
    RESULTS.write_text(text.replace(SECCOMP_MARKER, row + SECCOMP_MARKER, 1))


if __name__ == "__main__":
    sys.exit(main())
