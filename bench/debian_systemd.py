#!/usr/bin/env python3
"""Debian's whole boot: its kernel, its initramfs (initramfs-tools), its systemd, until
`systemctl is-system-running` answers (issue #15 item 5).

    pykvm image debian --kernel --packages systemd-sysv -o root.img     # once (~3 min)
    python3 bench/debian_systemd.py --image root.img --cpus 2 --record
    python3 bench/debian_systemd.py --image root.img --kernel vmlinuz-6.1.0-50-amd64 \
        --initrd initrd.img-6.1.0-50-amd64 --record     # another kernel of the image's /boot

The image's own kernel and initramfs boot it (``pykvm run --image root.img,ro
--image-kernel``): initramfs-tools loads the virtio modules, mounts ``/dev/vda`` and starts
the image's ``/sbin/init``, systemd. The question goes in on the kernel command line:
systemd's run generator (systemd-run-generator(8)) turns ``systemd.run=`` into a one-shot
unit the boot goes to, whose output journald forwards to the console; its success action
powers the guest off. Seconds of wall time from spawning pykvm to systemd's "Welcome to"
banner (the root's init running) and to the answer (any state but "offline" means systemd
is up and answering on its bus); the image read-only, so the cache's image stays as built.
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

MARKER = "<!-- debian_systemd.py --record adds rows above this line -->"
SECTION = (
    "\n## debian systemd — Debian's image, its kernel, initramfs and systemd, to "
    "`systemctl is-system-running`\n\n"
    "`python3 bench/debian_systemd.py --image root.img --record` adds a row (the image from "
    "`pykvm image debian --kernel --packages systemd-sysv`). Seconds of wall time from "
    "spawning `pykvm run --image root.img,ro --image-kernel -v` to initramfs-tools' hand-over "
    "(systemd's `Welcome to` banner) and to the answer of `systemctl is-system-running`, "
    "asked through `systemd.run=` on the kernel command line; 512 MiB.\n\n"
    "| date | host kind | kernel | vCPUs | start → systemd | start → answer | answer "
    "| load | note |\n|---|---|---|---|---|---|---|---|---|\n"
    f"{MARKER}\n")
WELCOME = "Welcome to "


def boot(image: Path, kernel: tuple[Path, Path] | None, cpus: int, append: str, timeout: float,
         log: Path | None) -> dict:
    from pykvm.distro.boot import SYSTEM_STATE_QUESTION, system_state_answer, systemd_run_words

    boot_files = ["--kernel", str(kernel[0]), "--initrd", str(kernel[1])] if kernel \
        else ["--image-kernel"]
    args = [sys.executable, "-m", "pykvm", "run", "--image", f"{image},ro", *boot_files,
            "--cpus", str(cpus), "-v", "--append",
            f"{systemd_run_words(SYSTEM_STATE_QUESTION)} {append}".strip()]
    started = time.monotonic()
    process = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    seen: dict[str, float | str] = {}
    tail: list[str] = []

    def watch() -> None:
        out = open(log, "w", buffering=1) if log else None
        for raw in process.stdout:
            line = raw.decode(errors="replace")
            tail[:] = (tail + [line])[-60:]
            if out:
                out.write(f"{time.monotonic() - started:8.1f} {line}")
            if WELCOME in line and "systemd" not in seen:
                seen["systemd"] = time.monotonic() - started
            state = system_state_answer(line)
            if state and "answer" not in seen:
                seen["answer"] = time.monotonic() - started
                seen["state"] = state

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(timeout=30)
    watcher.join(timeout=5)
    if "answer" not in seen:
        raise SystemExit(f"no answer from systemctl ({process.returncode}):\n{''.join(tail)}")
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True,
                        help="from `pykvm image debian --kernel --packages systemd-sysv`")
    parser.add_argument("--kernel", type=Path, help="boot this kernel instead of the image's "
                        "(another of its /boot, e.g. the generic flavour's), with --initrd")
    parser.add_argument("--initrd", type=Path, help="its initramfs (initramfs-tools')")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--append", default="", help="more kernel command line")
    parser.add_argument("--note", default="", help="what the row's note column says")
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--log", type=Path, help="the console, each line after its second")
    parser.add_argument("--record", action="store_true", help="add a row to bench/RESULTS.md")
    args = parser.parse_args()
    from pykvm.boot.bzimage import version_of_file
    from pykvm.distro.debian import beside
    from pykvm.kvm import detect_host_kind

    if (args.kernel is None) != (args.initrd is None):
        parser.error("--kernel and --initrd go together")
    files = (args.kernel, args.initrd) if args.kernel else None
    kernel = (version_of_file(args.kernel or beside(args.image)[0]) or "?").split()[0]
    load = os.getloadavg()[0]
    seen = boot(args.image, files, args.cpus, args.append, args.timeout, args.log)
    systemd = f"{seen['systemd']:.0f}" if "systemd" in seen else "?"
    print(f"{kernel}, {args.cpus} vCPU(s): start to systemd {systemd} s, to the answer "
          f"{seen['answer']:.0f} s ({seen['state']}), load {load:.1f}")
    if args.record:
        add_row(MARKER, SECTION,
                f"| {datetime.date.today()} | {detect_host_kind()} | {kernel} | {args.cpus} | "
                f"{systemd} | {seen['answer']:.0f} | {seen['state']} | {load:.1f} | "
                f"{args.note or 'pykvm default'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
