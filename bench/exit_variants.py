#!/usr/bin/env python3
"""Where pykvm's per-exit cost goes: bench/exits.py's pykvm side in variants, each
interleaved with the C reference in one run.

- **default**: as `pykvm run` runs a guest that never plants the #PF hook (on kvm_pvm:
  the early watch of pykvm/quirks/syscall.py armed, the vCPU thread under seccomp);
- **no early watch**: the same without EarlyPlant (no KVM_SYNC_X86_SREGS, no observer);
- **sync only**: KVM_SYNC_X86_SREGS on, no observer: what KVM's copy of the special
  registers into kvm_run costs at each exit;
- **no seccomp**: the default without the vCPU thread's seccomp filter (pykvm/sandbox);
- **neither**: no early watch, no seccomp.

Process CPU µs per exit (guest time included), medians over the rounds; "+µs" is the
variant's median minus C's. On hosts other than kvm_pvm there is no early watch and
the first three variants coincide.

    python3 bench/exit_variants.py                 # ring 0, 20000 exits x 5 rounds
    python3 bench/exit_variants.py --ring 3 -n 4000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH.parent) not in sys.path:
    sys.path.insert(0, str(BENCH.parent))

import exits  # noqa: E402  (bench/exits.py: the guest, the C reference, one pykvm run)
from pykvm import sandbox  # noqa: E402
from pykvm.kvm import Kvm  # noqa: E402
from pykvm.quirks import pvm  # noqa: E402

DEFAULT_ON_START = pvm.PvmQuirks.on_start


def without_early_watch(quirks, vm) -> None:
    quirks.syscalls.watch(vm)


def sync_only(quirks, vm) -> None:
    quirks.syscalls.watch(vm)
    for vcpu in vm.vcpus:
        vcpu.sync_sregs(True)


VARIANTS = {   # name: (PvmQuirks.on_start, seccomp on)
    "default": (DEFAULT_ON_START, True),
    "no early watch": (without_early_watch, True),
    "sync only": (sync_only, True),
    "no seccomp": (DEFAULT_ON_START, False),
    "neither": (without_early_watch, False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ring", type=int, choices=(0, 3), default=0)
    parser.add_argument("--exits", "-n", type=int, default=20000)
    parser.add_argument("--rounds", "-r", type=int, default=5)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    runs: dict[str, list[float]] = {"C": [], **{name: [] for name in VARIANTS}}
    try:
        with Kvm() as kvm, tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
            setup = exits.Setup(Path(tmp), args.ring, args.exits)
            exits.run_c(setup.c_binary, setup.image_path, args.exits)      # warm-up
            exits.run_pykvm(kvm, setup.image, args.exits)
            for _ in range(args.rounds):
                runs["C"].append(exits.run_c(setup.c_binary, setup.image_path, args.exits).cpu)
                for name, (on_start, seccomp) in VARIANTS.items():
                    pvm.PvmQuirks.on_start = on_start
                    sandbox.configure(enabled=seccomp)
                    runs[name].append(exits.run_pykvm(kvm, setup.image, args.exits).cpu)
    except exits.BenchError as error:
        print(f"exit_variants: {error}", file=sys.stderr)
        return 1
    finally:
        pvm.PvmQuirks.on_start = DEFAULT_ON_START
        sandbox.configure(enabled=True)
    c = statistics.median(runs["C"])
    print(f"ring {args.ring}, {args.exits} exits x {args.rounds} rounds, load average {load:.2f}")
    print(f"{'variant':<16}{'µs/exit':>9}{'min':>8}{'÷ C':>8}{'+µs':>7}")
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"{name:<16}{median:>9.2f}{min(values):>8.2f}{median / c:>8.3f}{median - c:>7.2f}")
    print(f"ratio: {statistics.median(runs['default']) / c:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
