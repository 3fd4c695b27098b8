#!/usr/bin/env python3
"""Boot time of Debian's own kernel: process start to /init and to a command's output.

    python3 bench/debian_boot.py                       # the cloud kernel, 1 vCPU
    python3 bench/debian_boot.py --flavour generic --cpus 2 --record
    python3 bench/debian_boot.py --append 'initcall_blacklist= mitigations=auto'   # a cut undone
    python3 bench/debian_boot.py --cpus 2 --clock-slowdown 1      # the guest's clock in real time

The kernel is Debian's package (pykvm/distro/kernel.py: apt-get download, dpkg-deb -x),
the initramfs pykvm's default guest's, the command ``cat /proc/uptime
/sys/devices/system/cpu/online`` (the guest's own clock at that point, and which CPUs came
up). ``pykvm run --cold -v`` prints the boot log on stderr; the bench
timestamps the line ``Run /init as init process`` as it arrives and the command's output.
On kvm_pvm pykvm adds its Debian command line (pykvm/quirks/cmdline.py); ``--append``
words with the same key replace its words (e.g. ``initcall_blacklist=`` restores every
initcall), which is how a row measures a cut undone.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.boot import add_row  # noqa: E402  (RESULTS.md's one writer)

MARKER = "<!-- debian_boot.py --record adds rows above this line -->"
SECTION = (
    "\n## debian boot — Debian's own kernel, process start to /init and to a command\n\n"
    "`python3 bench/debian_boot.py --record` adds a row. Seconds of wall time from spawning "
    "`pykvm run --kernel vmlinuz-6.1.0-*-{cloud-,}amd64 --cold -v -- cat /proc/uptime "
    "/sys/devices/system/cpu/online` (pykvm's initramfs) to the kernel's `Run /init` line and "
    "to the command's output; the guest's own clock at the command (its uptime) and the CPUs "
    "online; 512 MiB. Command line: pykvm's Debian default on kvm_pvm "
    "(pykvm/quirks/cmdline.py, docs/hosts.md), plus what the row's note adds.\n\n"
    "| date | host kind | kernel | vCPUs | start → /init | start → output | guest uptime "
    "| load | note |\n|---|---|---|---|---|---|---|---|---|\n"
    f"{MARKER}\n")
INIT_LINE = "Run /init as init process"
COMMAND = "cat /proc/uptime /sys/devices/system/cpu/online"


def boot(kernel: Path, cpus: int, append: str, timeout: float, profile: str = "",
         symbols: str = "", clock_slowdown: int = 0) -> dict:
    args = [sys.executable, "-m", "pykvm", "run", "--kernel", str(kernel), "--cpus", str(cpus),
            "--cold", "-v", "--clock-slowdown", str(clock_slowdown)]
    if append:
        args += ["--append", append]
    if profile:
        args += ["--profile", profile] + (["--symbols", symbols] if symbols else [])
    started = time.monotonic()
    process = subprocess.Popen([*args, "--", COMMAND], cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    seen: dict[str, float] = {}
    tail: list[str] = []

    def watch() -> None:
        for raw in process.stderr:
            line = raw.decode(errors="replace")
            tail[:] = (tail + [line])[-40:]
            if INIT_LINE in line and "init" not in seen:
                seen["init"] = time.monotonic() - started

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output = process.stdout.readline().decode(errors="replace").split()
    answered = time.monotonic() - started
    online = process.stdout.readline().decode(errors="replace").strip()
    process.wait(timeout=timeout)
    watcher.join(timeout=5)
    if process.returncode != 0 or not output:
        raise SystemExit(f"pykvm run failed ({process.returncode}):\n{''.join(tail)}")
    return {"init": seen.get("init"), "answer": answered, "uptime": float(output[0]),
            "online": online}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", choices=("cloud", "generic"), default="cloud")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--append", default="", help="more kernel command line")
    parser.add_argument("--clock-slowdown", type=int, default=0, metavar="N",
                        help="pykvm run --clock-slowdown N (default: pykvm's, 10 on kvm_pvm)")
    parser.add_argument("--note", default="", help="what the row's note column says")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--profile", default="", metavar="FILE",
                        help="pykvm run --profile FILE: where the boot's time went")
    parser.add_argument("--symbols", default="", metavar="FILE",
                        help="pykvm run --symbols FILE for the profile (Debian's System.map is "
                             "a stub: a vmlinux with symbols, e.g. from vmlinux-to-elf)")
    parser.add_argument("--record", action="store_true", help="add a row to bench/RESULTS.md")
    args = parser.parse_args()
    from pykvm.distro.kernel import fetch
    from pykvm.kvm import detect_host_kind

    kernel = fetch(args.flavour)
    load = os.getloadavg()[0]
    figures = boot(kernel.vmlinuz, args.cpus, args.append, args.timeout, args.profile,
                   args.symbols, args.clock_slowdown)
    init = f"{figures['init']:.0f}" if figures["init"] is not None else "?"
    print(f"{kernel.release}, {args.cpus} vCPU(s): start to /init {init} s, to output "
          f"{figures['answer']:.0f} s, guest uptime {figures['uptime']:.0f} s, CPUs online "
          f"{figures['online']}, load {load:.1f}")
    if args.record:
        note = args.note or (f"--append '{args.append}'" if args.append else "pykvm's default")
        add_row(MARKER, SECTION,
                f"| {datetime.date.today()} | {detect_host_kind()} | {kernel.release} | "
                f"{args.cpus} ({figures['online']} online) | {init} | {figures['answer']:.0f} | "
                f"{figures['uptime']:.0f} | "
                f"{load:.1f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
