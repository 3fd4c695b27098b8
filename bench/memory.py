#!/usr/bin/env python3
"""Memory: the VMM's resident set beyond guest RAM, a Linux guest with a disk and a NIC.

`pykvm run --mem 256M --disk IMG --net tap` boots the default Linux guest (a 64 MiB
sparse raw image on the disk, a TAP with no bridge and no address: no frame leaves
this machine). At the shell the guest reads its disk (`dd` of 4 MiB from /dev/vda)
and brings its NIC up, then the bench reads the pykvm process's
/proc/PID/smaps_rollup (everything resident) and /proc/PID/smaps (the guest RAM
mapping: the anonymous mapping of exactly the guest's RAM size), and reports

    beyond guest RAM = Rss(all) - Rss(guest RAM mapping)

split into anonymous memory (Python's heap, thread stacks, buffers) and file-backed
pages (the interpreter, shared libraries, imported modules' .pyc files mapped or
read). The reference, in the same run, is the same interpreter after `import
pykvm.cli` and nothing else (what any pykvm process pays before it builds a VM).

    python3 bench/memory.py              # boot to the shell (~1 min quiet, minutes loaded)
    python3 bench/memory.py --quick      # 5 s into the boot: devices and threads set up,
                                         # the guest has not driven them yet
    python3 bench/memory.py --record     # also add a row to bench/RESULTS.md

The last line is ``mib: X``, MiB resident beyond guest RAM (goal: at most 30).
"""

from __future__ import annotations

import argparse
import datetime
import os
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

from bench.results import add_rows  # noqa: E402

GOAL_MIB = 30
MEM = "256M"
MEM_BYTES = 256 << 20
DISK_MIB = 64
QUICK_SECONDS = 5.0
GUEST_WORK = ("dd if=/dev/vda of=/dev/null bs=64k count=64 2>/dev/null; ip link set eth0 up; "
              "echo @$((2+3))@")
GUEST_DONE = b"@5@"   # not in the echoed command line
MARKER = "<!-- memory.py --record adds rows above this line -->"


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Resident:
    """KiB resident in one process, from /proc/PID/smaps_rollup and /proc/PID/smaps."""

    rss: int
    anonymous: int
    guest_ram: int              # the guest RAM mappings' Rss
    guest_ram_anonymous: int    # ... of it anonymous (a MAP_PRIVATE mapping), else shmem

    @property
    def beyond(self) -> int:
        return self.rss - self.guest_ram

    @property
    def anonymous_beyond(self) -> int:
        return self.anonymous - self.guest_ram_anonymous

    @property
    def file_backed(self) -> int:
        """Beyond guest RAM and not anonymous: the interpreter's and libraries' pages."""
        return self.beyond - self.anonymous_beyond


def rollup(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])
    return fields


GUEST_RAM_NAME = "/memfd:pykvm-guest-ram"   # pykvm/memory.py's memfd


def guest_ram_rss(pid: int, size: int) -> tuple[int, int]:
    """(Rss, Anonymous) in KiB of pykvm's guest RAM mappings: its memfd's, or an
    anonymous mapping exactly ``size`` bytes long (how RAM was mapped before the memfd)."""
    rss = anonymous = 0
    current = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0] and len(head) >= 5:
            start, end = (int(x, 16) for x in head[0].split("-"))
            name = head[5] if len(head) >= 6 else ""
            current = name.startswith(GUEST_RAM_NAME) or (not name and end - start == size)
        elif current and head[0] == "Rss:":
            rss += int(head[1])
        elif current and head[0] == "Anonymous:":
            anonymous += int(head[1])
    return rss, anonymous


def measure(pid: int, guest_size: int) -> Resident:
    fields = rollup(pid)
    return Resident(fields["Rss"], fields.get("Anonymous", 0), *guest_ram_rss(pid, guest_size))


def reference() -> Resident:
    """The interpreter with pykvm's CLI imported, nothing else."""
    code = "import sys, pykvm.cli; print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    try:
        if child.stdout.readline() != b"ready\n":
            raise BenchError("the reference process did not start")
        return measure(child.pid, MEM_BYTES)
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def run_guest(quick: bool, workdir: Path, kernel: list[str]) -> Resident:
    from tests.guest_shell import BOOT_TIMEOUT, PROMPT, GuestShell

    disk = workdir / "disk.img"
    with open(disk, "wb") as image:
        image.truncate(DISK_MIB << 20)
    args = ["--mem", MEM, "--disk", str(disk), "--net", "tap", *kernel]
    with GuestShell(args, api_sock=workdir / "api.sock", log=workdir / "pykvm.log") as shell:
        if quick:
            time.sleep(QUICK_SECONDS)
            if shell.process.poll() is not None:
                raise BenchError(f"pykvm exited early: {(workdir / 'pykvm.log').read_text()}")
        else:
            shell.wait_for(PROMPT, BOOT_TIMEOUT)
            shell.type(GUEST_WORK + "\n")
            shell.wait_for(GUEST_DONE, BOOT_TIMEOUT)
        return measure(shell.process.pid, MEM_BYTES)


def mib(kib: int) -> float:
    return kib / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"measure {QUICK_SECONDS:g} s into the boot instead of at the shell")
    parser.add_argument("--record", action="store_true", help="add a row to bench/RESULTS.md")
    parser.add_argument("--kernel", type=Path, help="a guest directory's kernel (default: the "
                                                    "default guest's), with its initramfs.cpio")
    args = parser.parse_args(argv)
    from pykvm.kvm import detect_host_kind
    from pykvm.machine import default_guest_dir
    kernel = [] if args.kernel is None else \
        ["--kernel", str(args.kernel), "--initrd", str(args.kernel.parent / "initramfs.cpio")]
    if default_guest_dir() is None and not kernel:
        print("memory: the default Linux guest is not built (make guest)", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]
    try:
        ref = reference()
        with tempfile.TemporaryDirectory(prefix="pykvm-bench-memory-") as tmp:
            vmm = run_guest(args.quick, Path(tmp), kernel)
    except BenchError as error:
        print(f"memory: {error}", file=sys.stderr)
        return 1
    when = f"{QUICK_SECONDS:g} s into the boot" if args.quick else "at the shell, after dd + ip"
    print(f"VMM resident memory, Linux guest ({MEM} RAM, virtio disk + NIC), {when}; "
          f"load average {load:.2f}")
    print(f"{'MiB (anon, file: beyond RAM)':<32}{'Rss':>8}{'anon':>8}{'file':>8}{'guest RAM':>11}"
          f"{'beyond':>8}")
    for name, r in (("python + import pykvm.cli", ref), ("pykvm run", vmm)):
        print(f"{name:<32}{mib(r.rss):>8.1f}{mib(r.anonymous_beyond):>8.1f}"
              f"{mib(r.file_backed):>8.1f}"
              f"{mib(r.guest_ram):>11.1f}{mib(r.beyond):>8.1f}")
    print(f"beyond guest RAM: {mib(vmm.beyond):.1f} MiB ({mib(vmm.anonymous_beyond):.1f} "
          f"anonymous, {mib(vmm.file_backed):.1f} file-backed); the building VM adds "
          f"{mib(vmm.beyond - ref.beyond):.1f} MiB to the imported CLI; goal <= {GOAL_MIB} MiB: "
          f"{'met' if mib(vmm.beyond) <= GOAL_MIB else 'NOT met'}")
    if args.record:
        add_rows(MARKER, f"| {datetime.date.today()} | {detect_host_kind()} | "
                         f"{'boot +5 s' if args.quick else 'shell, dd + ip'} | "
                         f"{mib(ref.beyond):.1f} | {mib(vmm.rss):.1f} | {mib(vmm.guest_ram):.1f} | "
                         f"{mib(vmm.beyond):.1f} | {mib(vmm.anonymous_beyond):.1f} | "
                         f"{mib(vmm.file_backed):.1f} | {load:.1f} |\n")
    print(f"mib: {mib(vmm.beyond):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
