"""What every lesson script shares: pykvm importable from the source tree, the
host note, and the path of a built tutorial guest.

Imported first by each lesson (``import lesson``): Python puts the script's own
directory on sys.path, so this module is found, and it puts the top of the tree
there too, so ``python3 guests/tutorial/vmm/NN_name.py`` works without
installing pykvm.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
BUILD = ROOT / "guests" / "tutorial" / "build"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pykvm.bus import Device  # noqa: E402,F401  (needs the path above; lessons subclass it)
from pykvm.errors import PykvmError  # noqa: E402
from pykvm.kvm import Kvm, detect_host_kind  # noqa: E402

# What a kvm_pvm host does differently, in one paragraph per lesson topic
# (docs/hosts.md has the whole story).
PVM_NOTE = ("host: kvm_pvm (KVM without VT-x/AMD-V). These guests run in ring 0 (real mode\n"
            "is ring 0 too), and kvm_pvm emulates every ring-0 instruction in the kernel, one\n"
            "at a time; the exits are the same as on VT-x/AMD-V, only slower (docs/hosts.md)")


def host_note() -> None:
    """Print which kind of KVM runs the lesson, and on kvm_pvm what it emulates; stop
    with one line when /dev/kvm cannot be used (missing, no permission, another API)."""
    try:
        Kvm().close()
    except PykvmError as error:
        raise SystemExit(f"cannot run this lesson: {error}") from None
    kind = detect_host_kind()
    if kind == "kvm_pvm":
        print(PVM_NOTE)
    else:
        print(f"host: {kind} (guest code runs natively on the CPU)")


def guest(name: str) -> Path:
    """A guest built by `make guests`, or SystemExit with what to run."""
    path = BUILD / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make guests` first")
    return path


def per_exit(seconds: float, count: int) -> str:
    """A cost per event in microseconds, for printing (never for asserting)."""
    return f"{seconds / max(count, 1) * 1e6:.1f} µs"

