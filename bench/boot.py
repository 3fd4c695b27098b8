#!/usr/bin/env python3
"""Boot time of the default Linux guest: process start to the guest's /init.

The guest's /init writes PROGRESS_INIT_STARTED to pykvm's progress port as its
first act, and pykvm timestamps it (Firecracker's boot timer, done with a port).
The time is split into:

- VMM set-up: Python start, imports, /dev/kvm, guest RAM, devices, kernel load;
- kernel: from the first KVM_RUN to /init's first instruction;
- init: from /init's start to the command (`true`) starting, then to its exit.

Next to it, in the same run, QEMU (`-accel kvm`) boots the same kernel and
initramfs where this host lets it: it has no port for pykvm's boot timer, so its
time to init is read off its serial console ("Run /init as init process") with
a deadline; what happens when it cannot boot is recorded instead of a number.

    python3 bench/boot.py             # one pykvm boot, one QEMU attempt
    python3 bench/boot.py --record    # also add a row to bench/RESULTS.md

``--warm`` measures the boot cache instead (pykvm/warm): ``pykvm run -- CMD`` from
process start to the command's output, in a fresh, empty cache: the first run
boots cold (and caches the boot), the next ``--restores`` runs (3) restore it, and
the row gives their median; same configuration. The runs import a copy of the pykvm
package taken when the bench starts: the cache key covers pykvm's source, and in a
working tree that others edit meanwhile the restores would otherwise miss the entry
and boot again; the copy is byte-compiled once, as an installed package is. The goal is the restored run within 1 s wall.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from pykvm import layout  # noqa: E402
from pykvm.boot.cpio import command_archive  # noqa: E402
from pykvm.kvm import detect_host_kind  # noqa: E402
from pykvm.machine import default_guest_dir  # noqa: E402

RESULTS = BENCH / "RESULTS.md"
MARKER = "<!-- boot.py --record adds rows above this line -->"
WARM_MARKER = "<!-- boot.py --warm --record adds rows above this line -->"
WARM_COMMAND = "echo warm-start-answer"
COLD_NICENESS = 10

# Runs inside a fresh interpreter so "process start" means what it says.
PYKVM_PROBE = r"""
import io, json, sys, time
started = time.monotonic()
from pykvm.machine import MachineConfig, build_for_boot
from pathlib import Path
guest = Path(sys.argv[1])
config = MachineConfig(mem_size=256 << 20, kernel=guest / "vmlinux",
                       initrd=guest / "initramfs.cpio", command="true")
sink = io.BytesIO()
with build_for_boot(config, stdout=sink, stderr=sink) as machine:
    setup_done = time.monotonic()
    stop = machine.run(timeout=1800)
    ended = time.monotonic()
    print(json.dumps({"started": started, "setup_done": setup_done, "machine_started":
                      machine.started, "progress": machine.progress, "ended": ended,
                      "stop": stop.kind if stop else None, "status": stop.status if stop else None,
                      "host_kind": machine.kvm.host_kind}))
"""


def pykvm_boot(guest: Path) -> dict:
    output = subprocess.run([sys.executable, "-c", PYKVM_PROBE, str(guest)], cwd=ROOT,
                            capture_output=True, text=True, timeout=2400)
    if output.returncode != 0:
        raise SystemExit(f"pykvm boot failed: {output.stderr.strip()[-2000:]}")
    import json
    figures = json.loads(output.stdout.strip().splitlines()[-1])
    progress = {code: at for code, at in figures["progress"]}
    base = figures["machine_started"]
    setup = figures["setup_done"] - figures["started"]
    init_at = progress.get(layout.PROGRESS_INIT_STARTED)
    command_at = progress.get(layout.PROGRESS_COMMAND_STARTED)
    if init_at is None:
        raise SystemExit(f"the guest never reached /init ({figures['stop']})")
    kernel = (base + init_at) - figures["setup_done"]
    init = figures["ended"] - (base + init_at)
    return {"setup": setup, "kernel": kernel, "init": init,
            "to_init": setup + kernel, "total": figures["ended"] - figures["started"],
            "command": command_at, "host_kind": figures["host_kind"]}


def qemu_boot(guest: Path, deadline: float) -> str:
    """Seconds from QEMU's start to "Run /init", or what stopped it."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return "not installed (apt-get install qemu-system-x86)"
    initrd = guest / "initramfs.cpio"
    combined = Path(os.environ.get("TMPDIR", "/tmp")) / "pykvm-bench-initrd.cpio"
    data = initrd.read_bytes()
    combined.write_bytes(data + b"\0" * (-len(data) % 4) + command_archive("true"))
    command = [qemu, "-accel", "kvm", "-M", "pc", "-m", "256", "-nographic",
               "-no-reboot", "-kernel", str(guest / "bzImage"), "-initrd", str(combined),
               "-append", "console=ttyS0 reboot=k panic=-1 pci=off edd=off nopv noxsave "
                          "clearcpuid=smap,popcnt,movbe,rdrand lpj=1000000 tsc=reliable",
               "-device", f"isa-debug-exit,iobase={layout.EXIT_PORT:#x},iosize=1"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    seen = b""
    try:
        while time.monotonic() - started < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
                if b"Run /init as init process" in seen:
                    return f"{time.monotonic() - started:.1f}"
            if process.poll() is not None:
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    text = seen.decode(errors="replace")
    if "KVM internal error" in text:
        code = re.search(r"Code=.*<([0-9a-f]{2})>", text)
        at = f" at an instruction starting {code.group(1)}" if code else ""
        return f"stopped: KVM internal error (emulation failure){at}, which QEMU cannot complete"
    last = [line for line in text.splitlines() if line.strip()]
    where = last[-1].strip()[:80] if last else "no console output at all"
    return f"no init within {deadline:.0f} s (last console line: {where!r})"


def timed_run(env: dict, source: Path, niceness: int = 0) -> tuple[float, float]:
    """One `pykvm run -- CMD` of the pykvm in ``source`` (at ``niceness``): seconds from
    spawning it to the command's output on its stdout, and to its exit."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--", WARM_COMMAND],
                               preexec_fn=(lambda: os.nice(niceness)) if niceness else None,
                               cwd=source, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    line = process.stdout.readline()
    answered = time.monotonic() - started
    _, errors = process.communicate(timeout=2400)
    if process.returncode != 0 or line.strip() != WARM_COMMAND.split(" ", 1)[1].encode():
        raise SystemExit(f"pykvm run failed ({process.returncode}): {line!r} "
                         f"{errors.decode(errors='replace')[-2000:]}")
    return answered, time.monotonic() - started


def warm_start(guest: Path, restores: int) -> dict:
    """Cold then ``restores`` cached `pykvm run -- CMD` in a fresh cache (the guest named
    by path), of a copy of pykvm taken now (see the module docstring)."""
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pykvm-bench-warm-") as scratch:
        source = Path(scratch) / "source"
        shutil.copytree(ROOT / "pykvm", source / "pykvm",
                        ignore=shutil.ignore_patterns("__pycache__"))
        # compiled once, as an installed package is: these machines set
        # PYTHONDONTWRITEBYTECODE, and compiling ~200 modules anew made each run 0.45 s
        # longer at load 10 (bench/startup.py measures that side)
        compileall.compile_dir(source / "pykvm", quiet=1)
        env = dict(os.environ, PYKVM_CACHE=str(Path(scratch) / "cache"),
                   PYKVM_GUEST_DIR=str(guest), PYTHONPATH=str(source))
        # the cold boot (minutes on a shared kvm_pvm host) yields to others; the restores
        # are seconds, and a nice 10 process on a loaded host waits tens of milliseconds
        # for the CPU at each of the guest's system calls: they run at normal priority
        cold_answer, cold_exit = timed_run(env, source, niceness=COLD_NICENESS)
        warm = [timed_run(env, source) for _ in range(restores)]
    return {"cold_answer": cold_answer, "cold_exit": cold_exit,
            "warm_answer": statistics.median(answer for answer, _ in warm),
            "warm_exit": statistics.median(exit for _, exit in warm),
            "warm_answers": [answer for answer, _ in warm], "restores": restores,
            "host_kind": detect_host_kind()}


def add_row(marker: str, section: str, row: str) -> None:
    """``row`` above ``marker`` in RESULTS.md; ``section`` (the heading, text and table
    head, ending with the marker) is appended first when the marker is not there yet."""
    text = RESULTS.read_text()
    if marker not in text:
        text += section
    RESULTS.write_text(text.replace(marker, row + "\n" + marker))


def record_warm(figures: dict, load: float) -> None:
    add_row(WARM_MARKER,
            "\n## warm start — `pykvm run -- CMD`, cold vs from the boot cache\n\n"
            "`python3 bench/boot.py --warm --record` adds a row. Seconds of wall time from "
            f"spawning `pykvm run -- {WARM_COMMAND}` to its output, in an empty cache: the "
            "first run boots (and caches), the next ones restore (median); same "
            "configuration (the default guest, 512 MiB, 1 vCPU).\n\n"
            "| date | host kind | cold → output | cached → output | cached → exit "
            "| cold ÷ cached | load | restores |\n|---|---|---|---|---|---|---|---|\n"
            f"{WARM_MARKER}\n",
            f"| {datetime.date.today()} | {figures['host_kind']} | "
            f"{figures['cold_answer']:.1f} | {figures['warm_answer']:.2f} | "
            f"{figures['warm_exit']:.2f} | "
            f"{figures['cold_answer'] / figures['warm_answer']:.0f}x | {load:.1f} | "
            f"{figures['restores']} ({', '.join(f'{a:.2f}' for a in figures['warm_answers'])}) |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="add a row to bench/RESULTS.md")
    parser.add_argument("--qemu-deadline", type=float, default=300.0,
                        help="seconds QEMU gets to reach init (default 300)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU comparison")
    parser.add_argument("--warm", action="store_true",
                        help="time `pykvm run -- CMD` cold and from the boot cache instead")
    parser.add_argument("--restores", type=int, default=3,
                        help="with --warm: restored runs after the cold one (default 3)")
    args = parser.parse_args()
    guest = default_guest_dir()
    if guest is None:
        print("the default guest is not built: run `make guest`", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]
    if args.warm:
        figures = warm_start(guest, max(1, args.restores))
        print(f"host kind: {figures['host_kind']}   load: {load:.1f}")
        print(f"{'pykvm run -- CMD':<28} {'to output':>10} {'to exit':>10}")
        for name in ("cold", "warm"):
            label = "cold (boots, caches)" if name == "cold" else "cached (restores)"
            print(f"{label:<28} {figures[name + '_answer']:>10.3f} "
                  f"{figures[name + '_exit']:>10.3f}")
        print(f"restored runs to output: {', '.join(f'{a:.3f}' for a in figures['warm_answers'])}")
        if args.record:
            record_warm(figures, load)
        return 0
    figures = pykvm_boot(guest)
    qemu = "skipped" if args.no_qemu else qemu_boot(guest, args.qemu_deadline)
    print(f"host kind: {figures['host_kind']}   load: {load:.1f}")
    print(f"{'phase':<32} {'seconds':>9}")
    print(f"{'pykvm VMM set-up':<32} {figures['setup']:>9.3f}")
    print(f"{'pykvm kernel (to /init)':<32} {figures['kernel']:>9.3f}")
    print(f"{'pykvm init + `true` + exit':<32} {figures['init']:>9.3f}")
    print(f"{'pykvm process start to /init':<32} {figures['to_init']:>9.3f}")
    print(f"{'pykvm process start to exit':<32} {figures['total']:>9.3f}")
    print(f"{'QEMU start to /init':<32} {qemu:>9}")
    if args.record:
        add_row(MARKER,
                "\n## boot — default Linux guest, process start to /init\n\n"
                "`python3 bench/boot.py --record` adds a row. Seconds; QEMU boots the same "
                "bzImage and initramfs with `-accel kvm -M pc`.\n\n"
                "| date | host kind | VMM set-up | kernel | init + command | start to init "
                "| QEMU start to init | load |\n|---|---|---|---|---|---|---|---|\n"
                f"{MARKER}\n",
                f"| {datetime.date.today()} | {figures['host_kind']} | {figures['setup']:.2f} | "
                f"{figures['kernel']:.1f} | {figures['init']:.1f} | {figures['to_init']:.1f} | "
                f"{qemu} | {load:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
