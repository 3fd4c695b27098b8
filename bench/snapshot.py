#!/usr/bin/env python3
"""Restore against cold boot: seconds until the default Linux guest answers a command.

In one run:

1. **cold boot** — `pykvm run --mem 256M --api-sock S` (interactive shell on the
   serial console): seconds from starting the process until the guest answers
   `echo @$((6*7))@` (typed once the prompt shows) with `@42@`;
2. **snapshot** at that shell through the control socket (`pykvm ctl S snapshot DIR`):
   its seconds, and memory.bin's size on disk against guest RAM;
3. **restore**, N times (default 3) — `pykvm run --restore DIR`: seconds from starting
   the process until the guest answers the same command (typed at once: it waits in
   the pipe until the guest runs). The median is compared with the cold boot.
4. the library's `restore_machine()` in this process, split into checking state.json,
   verifying memory.bin's digest, and building the machine with its state.

Each restore's seconds are split with the control socket's ``stats`` asked once the
answer is in: pykvm's start (process start until the vCPU thread starts: seconds minus
the vCPU's wall time), the time inside KVM_RUN (the guest, and on kvm_pvm the host's
emulation of its ring 0) and in pykvm's exit handlers, the exits and pykvm's
completions (system calls, instructions); the vCPU's wall time runs on until that
request, a few ms past the answer, idle in the guest's HLT.

The goal is a restore at most 1/50 of the cold boot. On kvm_pvm hosts a typed
character costs the guest tens of milliseconds (its tty and shell run emulated ring-0
code and system calls), so the command is kept short.

    python3 bench/snapshot.py              # one boot, 3 restores
    python3 bench/snapshot.py --record     # also add a row to bench/RESULTS.md
    python3 bench/snapshot.py --keep DIR   # keep the snapshot in DIR (a new directory)
    python3 bench/snapshot.py --snapshot DIR --quick
                                           # no cold boot: 3 restores of DIR (a snapshot
                                           # taken at the shell, e.g. by --keep); the last
                                           # line is then the restore's seconds
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
sys.path.insert(0, str(ROOT))

from bench.startup import child_environment  # noqa: E402
from pykvm.kvm import detect_host_kind  # noqa: E402
from pykvm.machine import default_guest_dir  # noqa: E402
from tests.guest_shell import BOOT_TIMEOUT, PROMPT, GuestShell  # noqa: E402

RESULTS = BENCH / "RESULTS.md"
MARKER = "<!-- snapshot.py --record adds rows above this line -->"
RESTORE_GOAL = 0.15            # seconds, `pykvm run --restore` to the guest's answer (issue #13)
COMMAND = "echo @$((6*7))@\n"
ANSWER = b"@42@"
SECTION = f"""
## snapshot — restore vs cold boot of the default Linux guest

`python3 bench/snapshot.py --record` adds a row. Seconds from starting `pykvm run` until
the guest's shell answers a command (cold: `--mem 256M`, the command typed at the prompt;
restore: `--restore DIR`, the command typed at once), median of the restores; the
snapshot taken at the shell through the control socket; memory.bin on disk against
guest RAM; load is the 1-minute load average at the start (2 CPUs).

| date | host kind | cold boot → answer | restore → answer | restore ÷ cold | snapshot s | RAM | memory.bin on disk | load |
|---|---|---|---|---|---|---|---|---|
{MARKER}
"""


def answer_time(shell: GuestShell, started: float, *, wait_prompt: bool) -> float:
    if wait_prompt:
        shell.wait_for(PROMPT, BOOT_TIMEOUT)
    shell.type(COMMAND)
    shell.wait_for(ANSWER, BOOT_TIMEOUT)
    return time.monotonic() - started


def vcpu_split(stats: dict, seconds: float) -> dict:
    """Where a restore's ``seconds`` to the answer went, from the control socket's
    ``stats`` (one vCPU): pykvm's start, inside KVM_RUN, pykvm's handlers, exits."""
    vcpu = stats["vcpus"][0]
    times = {name: ns / 1e9 for name, ns in vcpu["time_ns"].items()}
    return {"start": seconds - times["wall"], "guest": times["guest"],
            "handlers": times["handlers"], "exits": sum(vcpu["exits"].values()),
            "completed": sum(vcpu["quirks"].values())}


def format_split(split: dict) -> str:
    return (f"pykvm start {split['start']:.3f} s, then inside KVM_RUN {split['guest']:.3f} s, "
            f"pykvm handlers {split['handlers']:.3f} s ({split['exits']} exits, "
            f"{split['completed']} completions)")


def library_restore(directory: Path) -> dict:
    """restore_machine() phases, in this process (the guest is not started)."""
    import io

    from pykvm.machine import build_from_snapshot as restore_machine
    from pykvm.snapshot.config import decode_config
    from pykvm.snapshot.snapshot import load_state, verify_memory
    t0 = time.monotonic()
    document = load_state(directory)
    t1 = time.monotonic()
    verify_memory(directory, document)
    t2 = time.monotonic()
    decode_config(document["config"] if isinstance(document, dict) else document.config)
    with restore_machine(directory, stdout=io.BytesIO(), verify=False):
        t3 = time.monotonic()
    return {"check state.json": t1 - t0, "verify memory.bin": t2 - t1,
            "build machine + state": t3 - t2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restores", type=int, default=3)
    parser.add_argument("--mem", default="256M")
    parser.add_argument("--record", action="store_true", help="append a row to bench/RESULTS.md")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="take the snapshot into DIR (must not exist) and keep it")
    parser.add_argument("--snapshot", type=Path, metavar="DIR",
                        help="no cold boot: restore this snapshot (taken at the shell)")
    parser.add_argument("--quick", action="store_true",
                        help="with --snapshot: the restores only, no library split")
    args = parser.parse_args()
    if default_guest_dir() is None and args.snapshot is None:
        print("the default Linux guest is not built (make guest)", file=sys.stderr)
        return 1
    if args.record and args.snapshot is not None:
        parser.error("--record needs the cold boot (no --snapshot)")
    load = os.getloadavg()[0]
    host = detect_host_kind()
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-snapshot-") as tmp:
        work = Path(tmp)
        # pykvm processes with the bytecode cache on, as an installed pykvm has it
        # (bench/startup.py); the first run fills it.
        os.environ.clear()
        os.environ.update(child_environment(work / "pycache"))
        snap = args.snapshot or args.keep or work / "snap"
        if args.snapshot is None:
            started = time.monotonic()
            with GuestShell(["--mem", args.mem], api_sock=work / "boot.sock",
                            log=work / "boot.log") as shell:
                cold = answer_time(shell, started, wait_prompt=True)
                print(f"cold boot: {cold:.1f} s to the answer", flush=True)
                info = shell.snapshot(snap)
            print(f"snapshot: {info['seconds']:.2f} s, {info['mem_size'] >> 20} MiB RAM, "
                  f"{info['disk_bytes'] / (1 << 20):.1f} MiB on disk", flush=True)
        restores, splits = [], []
        if args.snapshot is not None:   # no cold boot filled the bytecode cache: a restore does
            with GuestShell(["--restore", str(snap)], api_sock=work / "warm.sock",
                            log=work / "warm.log") as shell:
                answer_time(shell, time.monotonic(), wait_prompt=False)
        for index in range(args.restores):
            started = time.monotonic()
            with GuestShell(["--restore", str(snap)], api_sock=work / f"r{index}.sock",
                            log=work / f"r{index}.log") as shell:
                restores.append(answer_time(shell, started, wait_prompt=False))
                splits.append(vcpu_split(shell.ctl("stats"), restores[-1]))
            print(f"restore {index + 1}: {restores[-1]:.2f} s to the answer: "
                  f"{format_split(splits[-1])}", flush=True)
        phases = None if args.quick else library_restore(snap)
    restore = statistics.median(restores)
    split = splits[restores.index(restore)] if restore in restores else splits[0]
    if args.snapshot is not None:
        print()
        print(f"host kind: {host}, load {load:.1f}")
        print(f"restore to answer:    {restore:8.2f} s (median of {len(restores)}: "
              f"{', '.join(f'{r:.2f}' for r in restores)}); goal <= {RESTORE_GOAL:.2f} s")
        print(f"  of which:           {format_split(split)}")
        if phases:
            print("restore_machine():    " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
        print(f"seconds: {restore:.3f}")
        return 0
    ratio = restore / cold
    print()
    print(f"host kind: {host}, load {load:.1f}")
    print(f"cold boot to answer:  {cold:8.2f} s")
    print(f"restore to answer:    {restore:8.2f} s (median of {len(restores)}: "
          f"{', '.join(f'{r:.2f}' for r in restores)})")
    print(f"  of which:           {format_split(split)}")
    print("restore_machine():    " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    print(f"snapshot:             {info['seconds']:8.2f} s; memory.bin "
          f"{info['disk_bytes'] / (1 << 20):.1f} MiB on disk for {info['mem_size'] >> 20} MiB "
          f"of RAM ({100 * info['disk_bytes'] / info['mem_size']:.1f} %)")
    print(f"goal: restore <= 1/50 of the cold boot ({cold / 50:.2f} s): "
          f"{'met' if ratio <= 1 / 50 else 'NOT met'}")
    print(f"ratio: {ratio:.4f}")
    if args.record:
        record(host, cold, restore, ratio, info, load)
    return 0


def record(host: str, cold: float, restore: float, ratio: float, info: dict, load: float) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Bench results\n"
    if MARKER not in text:
        text = text.rstrip("\n") + "\n" + SECTION
    row = (f"| {datetime.date.today()} | {host} | {cold:.1f} | {restore:.2f} | 1/{1 / ratio:.0f} "
           f"| {info['seconds']:.2f} | {info['mem_size'] >> 20} MiB "
           f"| {info['disk_bytes'] / (1 << 20):.1f} MiB | {load:.1f} |\n")
    RESULTS.write_text(text.replace(MARKER, row + MARKER, 1))
    print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
