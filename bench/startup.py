#!/usr/bin/env python3
"""Start-up: seconds from starting `pykvm run` until its vCPU first enters the guest.

Interpreter start plus imports dominate every short run and every restore, so this
bench times the whole command as a user runs it, against the same interpreter doing
nothing (the reference, in the same run):

- **reference**: `python -c "..."` writes the clock once and exits: the floor any
  Python VMM pays here (interpreter, site, the venv's .pth files);
- **flat**: `pykvm run --flat GUEST --entry real` on a real-mode guest that prints
  one byte and exits;
- **restore** (with `--restore DIR`, a snapshot taken at the default guest's shell,
  e.g. by `bench/snapshot.py --keep DIR`): `pykvm run --restore DIR`.

Children run with Python's bytecode cache on, as an installed pykvm has it: the cache
lives in the bench's temporary directory (PYTHONPYCACHEPREFIX), filled by the first,
discarded round. Where PYTHONDONTWRITEBYTECODE is set (these development machines set
it) every start compiles pykvm's sources again; `--no-bytecode-cache` measures that.

Each pykvm run goes through `pykvm.cli.main` in a child process whose KVM_RUN ioctl
(`pykvm.vstate.vcpu._kvm_run_ioctl`) is wrapped to write the monotonic clock to a pipe at
its first call; the parent reads the clock just before it starts the child. Rounds
interleave the sides (reference, flat, restore, ...) so host noise hits each.

    python3 bench/startup.py                    # 10 rounds
    python3 bench/startup.py --quick            # 3 rounds
    python3 bench/startup.py --restore DIR      # also --restore -> first KVM_RUN
    python3 bench/startup.py --importtime       # the slowest imports of a flat run
    python3 bench/startup.py --no-bytecode-cache  # as the environment has it
    python3 bench/startup.py --record           # also add a row to bench/RESULTS.md

The last two lines are ``seconds: X``, the flat run's median seconds to its first
KVM_RUN (goal: at most 0.10 s), and ``ratio: X``, that ÷ the reference's (the figure
to compare across loads).
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.results import add_rows  # noqa: E402

FLAT_GOAL = 0.10       # seconds, process start -> first KVM_RUN of a flat guest (issue #13)
RESTORE_GOAL = 0.15    # seconds, --restore -> the guest answers (bench/snapshot.py measures that)
MARKER = "<!-- startup.py --record adds rows above this line -->"

# 16-bit real mode at pykvm's flat load address: one byte to COM1, then the exit port.
GUEST = """
.code16
.globl _start
_start:
    mov $0x3f8, %dx
    mov $'!', %al
    out %al, %dx
    mov $0xf4, %dx
    xor %al, %al
    out %al, %dx
1:  hlt
    jmp 1b
"""

# The child: pykvm's own CLI, with the first KVM_RUN reported on fd FD.
CHILD = """
import os, sys, time
import pykvm.vstate.vcpu as vcpu
fd, real = [int(os.environ["PYKVM_BENCH_FD"])], vcpu._kvm_run_ioctl
def first_run(*args):
    if fd[0] >= 0:
        os.write(fd[0], f"{time.monotonic()!r}\\n".encode())
        os.close(fd[0])
        fd[0] = -1
    return real(*args)
vcpu._kvm_run_ioctl = first_run
from pykvm.cli import main
sys.exit(main(sys.argv[1:]))
"""
REFERENCE = ("import os, time; "
             "os.write(int(os.environ['PYKVM_BENCH_FD']), f'{time.monotonic()!r}\\n'.encode())")


class BenchError(Exception):
    pass


def build_guest(workdir: Path) -> Path:
    source, obj, binary = workdir / "g.S", workdir / "g.o", workdir / "g.bin"
    source.write_text(GUEST)
    for argv in (["as", "--32", "-o", str(obj), str(source)],
                 ["ld", "-m", "elf_i386", "-Ttext=0", "--oformat", "binary", "-o", str(binary),
                  str(obj)]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return binary


def child_environment(pycache: Path | None) -> dict[str, str]:
    """The children's environment: with ``pycache``, Python's bytecode cache on (as a user
    has it) and kept there, out of the source tree, even where PYTHONDONTWRITEBYTECODE is
    set; without, the caller's as it is."""
    env = dict(os.environ)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def time_to_report(code: str, args: list[str], env: dict[str, str], *, stdin: bytes = b"",
                   timeout: float = 60) -> float:
    """Seconds from starting ``python -c code args`` until it writes the clock to its pipe."""
    read_fd, write_fd = os.pipe()
    env = {**env, "PYKVM_BENCH_FD": str(write_fd)}
    try:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                                 pass_fds=(write_fd,), stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(write_fd)
        write_fd = -1
        if stdin:
            child.stdin.write(stdin)
            child.stdin.flush()
        reported = b""
        while True:
            chunk = os.read(read_fd, 64)   # EOF: the child exited without reporting
            if not chunk:
                break
            reported += chunk
            if reported.endswith(b"\n"):
                break
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            _, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            _, err = child.communicate()
        if not reported:
            raise BenchError(f"the child never reached KVM_RUN: {err.decode(errors='replace')}")
        return float(reported.decode().split()[0]) - started
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def importtime(guest: Path, env: dict[str, str], top: int = 15) -> list[tuple[int, str]]:
    """The slowest top-level and second-level imports of one flat run (-X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pykvm", "run", "--flat",
                           str(guest), "--entry", "real"], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and len(name) - len(name.lstrip()) <= 3:
                rows.append((int(cumulative), name.rstrip()))
    return sorted(rows, reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", "-r", type=int, default=10, help="runs of each side (10)")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--restore", type=Path, metavar="DIR",
                        help="also time `pykvm run --restore DIR` (a snapshot at the shell)")
    parser.add_argument("--importtime", action="store_true",
                        help="print the slowest imports of one flat run")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="leave the environment's PYTHONDONTWRITEBYTECODE as it is (every "
                             "start compiles pykvm's sources when it is set)")
    parser.add_argument("--record", action="store_true", help="add a row to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    load = os.getloadavg()[0]
    sides: dict[str, list[float]] = {"reference": [], "flat": []}
    if args.restore is not None:
        sides["restore"] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-bench-startup-") as tmp:
            guest = build_guest(Path(tmp))
            env = child_environment(None if args.no_bytecode_cache else Path(tmp) / "pycache")
            flat = ["run", "--flat", str(guest), "--entry", "real"]
            for index in range(args.rounds + 1):       # the first round warms the page cache
                runs = {"reference": time_to_report(REFERENCE, [], env),
                        "flat": time_to_report(CHILD, flat, env)}
                if args.restore is not None:
                    runs["restore"] = time_to_report(
                        CHILD, ["run", "--restore", str(args.restore)], env)
                if index:
                    for side, seconds in runs.items():
                        sides[side].append(seconds)
                    if not args.quick:
                        print(f"round {index}/{args.rounds}: " + ", ".join(
                            f"{side} {seconds * 1000:.1f} ms" for side, seconds in runs.items()),
                            file=sys.stderr)
            slowest = importtime(guest, env) if args.importtime else []
    except BenchError as error:
        print(f"startup: {error}", file=sys.stderr)
        return 1

    medians = {side: statistics.median(values) for side, values in sides.items()}
    reference = medians["reference"]
    cache = "off (as the environment has it)" if args.no_bytecode_cache else "on"
    print(f"process start -> first KVM_RUN (ms), {args.rounds} rounds, load average {load:.2f}, "
          f"bytecode cache {cache}")
    print(f"{'':<12}{'median':>8}{'min':>8}{'max':>8}{'÷ ref':>8}")
    for side, values in sides.items():
        print(f"{side:<12}{medians[side] * 1000:>8.1f}{min(values) * 1000:>8.1f}"
              f"{max(values) * 1000:>8.1f}{medians[side] / reference:>8.2f}")
    print(f"goal: flat <= {FLAT_GOAL:.2f} s: "
          f"{'met' if medians['flat'] <= FLAT_GOAL else 'NOT met'}")
    for cumulative, name in slowest:
        print(f"  import {cumulative / 1000:7.1f} ms  {name.strip()}")
    if args.record:
        record(medians, load, args.rounds, cached=not args.no_bytecode_cache)
    print(f"seconds: {medians['flat']:.3f}")
    print(f"ratio: {medians['flat'] / reference:.3f}")
    return 0


def record(medians: dict[str, float], load: float, rounds: int, *, cached: bool) -> None:
    restore = f"{medians['restore'] * 1000:.0f}" if "restore" in medians else "—"
    from pykvm.kvm import detect_host_kind
    add_rows(MARKER, f"| {datetime.date.today()} | {detect_host_kind()} | "
                     f"{medians['reference'] * 1000:.0f} | {medians['flat'] * 1000:.0f} | "
                     f"{medians['flat'] / medians['reference']:.2f} | {restore} | "
                     f"{'on' if cached else 'off'} | {load:.1f} | "
                     f"{rounds} |\n")


if __name__ == "__main__":
    sys.exit(main())
