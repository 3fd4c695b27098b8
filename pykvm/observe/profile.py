"""``pykvm run --profile FILE``: where the guest's time goes, by sampling its RIP.

Why: on a host that emulates guest ring 0 (kvm_pvm, docs/hosts.md) a kernel boot
makes few exits, so the exit trace and KVM's counters say little about where minutes
go; a statistical profile of the instruction pointer does. It also answers on VT-x
hosts, where a guest kernel spinning in one function shows the same way.

How: a host thread asks every vCPU for its registers ``hz`` times a second through
:meth:`~pykvm.vstate.vcpu.Vcpu.call`: KVM_GET_REGS is only valid from the vCPU's own
thread, so the request is queued, KVM_RUN is kicked out with a signal (EINTR), and the
vCPU thread reads its state, RIP and the privilege level between two runs (Intel SDM
vol. 3A 5.5: CPL is CS.RPL); a halted vCPU or one still waiting for its start-up IPI
counts as ``[halted]`` or ``[not started]``, whatever its RIP. Each sample costs the guest one exit per
vCPU (about 10-30 us here), so 50 samples a second cost it well under 1 %.

Samples are grouped by symbol (``--symbols``: a vmlinux ELF or a System.map) or, with
none, by 4 KiB page; samples in guest user mode (CPL 3) count as ``[user]``. The table is
rewritten every ``WRITE_INTERVAL`` seconds while the guest runs (a long boot stopped
half-way still leaves its profile) and once more at the end, through a fresh file
(O_EXCL|O_NOFOLLOW) renamed over FILE, so a symlink at FILE is replaced, never followed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..ioctl import requests as r

DEFAULT_HZ = 50.0
MAX_HZ = 1000.0                 # each sample is an exit per vCPU: bound what it costs
WRITE_INTERVAL = 10.0           # seconds between rewrites of the table
CALL_TIMEOUT = 2.0              # a vCPU that does not answer is skipped this round
PAGE = 0x1000


@dataclass(frozen=True)
class ProfileRow:
    name: str            # symbol, '[user]', '[page 0x...]' or '[no answer]'
    samples: int
    share: float         # of all samples of all vCPUs


# What a vCPU that runs no code is doing (KVM_GET_MP_STATE, api.rst 4.38), by state.
NOT_RUNNING = {r.KVM_MP_STATE_UNINITIALIZED: "[not started: waits for INIT/SIPI]",
               r.KVM_MP_STATE_INIT_RECEIVED: "[not started: waits for INIT/SIPI]",
               r.KVM_MP_STATE_SIPI_RECEIVED: "[not started: waits for INIT/SIPI]",
               r.KVM_MP_STATE_HALTED: "[halted]"}


def read_position(vcpu) -> tuple[str, int]:
    """On the vCPU thread: what it does now, as ('', RIP) for ring-0..2 code, ('[user]',
    RIP) for CPL 3, or (state, 0) for a vCPU that runs nothing (halted, not started)."""
    state = NOT_RUNNING.get(vcpu.get_mp_state())
    if state is not None:
        return state, 0
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    return ("[user]" if sregs.cs.selector & 3 == 3 else ""), regs.rip


class RipSampler:
    """Samples every vCPU's RIP from a thread of its own until :meth:`stop`."""

    def __init__(self, vm, path: str | os.PathLike, hz: float = DEFAULT_HZ, symbols=None):
        check_hz(hz)
        self.vm, self.path, self.hz, self.symbols = vm, Path(path), hz, symbols
        self.counts: Counter[tuple[str, int]] = Counter()   # read_position() -> samples
        self.missed = 0
        self.started = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rip-sampler", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CALL_TIMEOUT * 2)
        self.write()

    def sample_once(self) -> None:
        for vcpu in self.vm.vcpus:
            try:
                self.counts[vcpu.call(read_position, timeout=CALL_TIMEOUT)] += 1
            except Exception:       # stopped, or busy past the timeout: counted, not fatal
                self.missed += 1

    def _run(self) -> None:
        period, last_write = 1.0 / self.hz, time.monotonic()
        while not self._done.wait(period):
            self.sample_once()
            if time.monotonic() - last_write >= WRITE_INTERVAL:
                self.write()
                last_write = time.monotonic()

    # --- the table ------------------------------------------------------------------------
    def _name(self, state: str, rip: int) -> str:
        if state:
            return state
        if self.symbols is not None:
            found = self.symbols.lookup(rip)
            if found is not None:
                return found[0].name
        return f"[page {rip & ~(PAGE - 1):#x}]"

    def rows(self) -> list[ProfileRow]:
        by_name: Counter[str] = Counter()
        for (state, rip), samples in self.counts.items():
            by_name[self._name(state, rip)] += samples
        if self.missed:
            by_name["[no answer]"] += self.missed
        total = sum(by_name.values()) or 1
        return [ProfileRow(name, samples, samples / total)
                for name, samples in by_name.most_common()]

    def format(self, top: int = 200) -> str:
        rows = self.rows()
        total = sum(row.samples for row in rows)
        lines = [f"# pykvm RIP profile: {total} samples of {len(self.vm.vcpus)} vCPU(s) at "
                 f"{self.hz:g} Hz over {time.monotonic() - self.started:.1f} s wall",
                 f"{'samples':>8} {'share':>6}  where"]
        lines += [f"{row.samples:8d} {row.share:6.1%}  {row.name}" for row in rows[:top]]
        if len(rows) > top:
            rest = rows[top:]
            lines.append(f"{sum(r.samples for r in rest):8d} "
                         f"{sum(r.share for r in rest):6.1%}  ({len(rest)} more)")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """Replace FILE with the table: a fresh file beside it, renamed over it."""
        directory = self.path.parent
        temporary = directory / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError:
            return      # reported by check_path before the run; a vanished directory is not
        with os.fdopen(fd, "w") as out:
            out.write(self.format())
        os.replace(temporary, self.path)


def check_hz(hz: float) -> None:
    if not 0 < hz <= MAX_HZ:
        raise ConfigError(f"--profile-hz must be above 0 and at most {MAX_HZ:g}")


def check_options(path: str | os.PathLike, hz: float) -> None:
    """--profile FILE and --profile-hz, checked before anything boots."""
    directory = Path(path).parent
    if not directory.is_dir():
        raise ConfigError(f"--profile {path}: no directory {directory}")
    check_hz(hz)
