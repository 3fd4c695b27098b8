"""What the plugin keeps for one pytest session: whether KVM can be used through
each device, and the Linux guests it booted: each distinct machine is booted once,
snapshotted with its agent answering (pykvm/warm/cache.py keeps the snapshots between
sessions), and every test gets a fresh guest restored from it, onto the test's own disk
images (keyed over their content: pykvm/warm/guest.py); where no snapshot can be used,
the booted guest is shared by the session's tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest

from pykvm.errors import GuestBootFailed, PykvmError
from pykvm.warm.guest import ConsoleLog, GuestSpec

from .linux import LinuxVm
from .options import option

DEFAULT_BOOT_TIMEOUT = 900.0
SNAPSHOTS_KEPT = 6


def kvm_unavailable_reason(device: str) -> str | None:
    """Why ``device`` cannot run pykvm's guests, or None when it can."""
    from pykvm.errors import KvmUnavailable
    from pykvm.kvm import Kvm

    try:
        Kvm(device).close()
    except KvmUnavailable as error:
        return str(error)
    return None


def default_snapshot_root() -> Path:
    """Where snapshots of booted guests are kept between sessions by default."""
    cache = os.environ.get("PYKVM_CACHE") or Path.home() / ".cache" / "pykvm"
    return Path(cache) / "snapshots"


class Session:
    """What the plugin keeps for one pytest session."""

    def __init__(self, config):
        self.config = config
        self._reasons: dict[str, str | None] = {}
        self._snapshots: dict[str, Path] = {}
        self._shared: dict[str, LinuxVm] = {}
        self._tmp: Path | None = None

    def unavailable(self, device: str) -> str | None:
        if device not in self._reasons:
            self._reasons[device] = kvm_unavailable_reason(device)
        return self._reasons[device]

    @property
    def boot_timeout(self) -> float:
        value = self.config.getoption("pykvm_boot_timeout", default=None)
        return float(value) if value else DEFAULT_BOOT_TIMEOUT

    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="pykvm-pytest-"))
        return self._tmp

    def snapshot_root(self) -> Path:
        chosen = option(self.config, "pykvm_snapshots", "PYKVM_SNAPSHOTS")
        if chosen and chosen.lower() == "none":
            return self.tmp() / "snapshots"
        return Path(chosen) if chosen else default_snapshot_root()

    def cache(self):
        """The snapshots, kept like `pykvm run`'s boot cache (pykvm/warm/cache.py): the
        SNAPSHOTS_KEPT most recently used."""
        from pykvm.warm.cache import BootCache

        return BootCache(self.snapshot_root(), cap=None, max_entries=SNAPSHOTS_KEPT)

    # --- giving a test its guest ---------------------------------------------------------------------
    def linux_vm(self, spec: GuestSpec, device: str) -> LinuxVm:
        if not spec.restorable:
            return self._boot(spec, device)
        key = spec.key(device)
        shared = self._shared.get(key)
        if shared is not None and shared.running:
            return shared
        snapshot = self._snapshots.get(key) or self.cache().lookup(key)
        if snapshot is not None:
            guest = self._try_restore(key, snapshot, spec, device)
            if guest is not None:
                return guest
        booted = self._boot(spec, device)
        snapshot = self._take_snapshot(booted, spec, key)
        if snapshot is not None and spec.disks:
            booted.close()              # it holds its images' locks, which a restore takes
            booted = None
        guest = self._try_restore(key, snapshot, spec, device) if snapshot is not None else None
        if guest is None:               # no snapshots here: a booted guest serves the session
            booted = booted or self._boot(spec, device)
            booted.origin = "booted once for the session (no snapshot could be used)"
            self._shared[key] = booted
            return booted
        if booted is not None:
            booted.close()
        return guest

    def _try_restore(self, key: str, snapshot: Path, spec: GuestSpec,
                     device: str) -> LinuxVm | None:
        try:
            guest = self._restore(snapshot, spec, device)
        except PykvmError as error:
            warnings.warn(pytest.PytestWarning(f"pykvm: cannot restore {snapshot}: {error}; "
                                               f"booting instead"))
            self._snapshots.pop(key, None)
            self.cache().drop(snapshot)
            return None
        self._snapshots[key] = snapshot
        return guest

    def release(self, guest: LinuxVm) -> None:
        if guest not in self._shared.values():
            guest.close()

    def _boot(self, spec: GuestSpec, device: str) -> LinuxVm:
        from pykvm.warm.guest import boot_guest

        console = ConsoleLog()
        try:
            return boot_guest(spec, device, console, self.boot_timeout, factory=LinuxVm)
        except (PykvmError, OSError) as error:
            tail = console.text(4096)
            raise GuestBootFailed(f"the Linux guest's agent did not answer: {error}\n"
                                  f"--- console (tail) ---\n{tail}") from None

    def _take_snapshot(self, guest: LinuxVm, spec: GuestSpec, key: str) -> Path | None:
        try:
            return self.cache().store(guest.machine, key, spec.describe(),
                                      guest.console.getvalue())
        except (PykvmError, OSError) as error:
            warnings.warn(pytest.PytestWarning(f"pykvm: no snapshot of the booted guest "
                                               f"({error}); its tests share one guest"))
            return None

    def _restore(self, snapshot: Path, spec: GuestSpec, device: str) -> LinuxVm:
        from pykvm.warm.cache import BOOT_LOG
        from pykvm.warm.guest import restore_guest

        # the plugin took this snapshot itself (its shares are the spec's own): trusted;
        # the disks are this test's images (the key says their bytes are the snapshot's)
        guest = restore_guest(snapshot, device, ConsoleLog(), factory=LinuxVm, disks=spec.disks)
        guest.origin = f"restored from {snapshot}"
        guest.snapshot = snapshot
        boot_log = snapshot / BOOT_LOG
        if boot_log.exists():
            guest.boot_log = boot_log.read_bytes().decode(errors="replace")
        self.cache().touch(snapshot)    # recently used: kept by the eviction
        return guest

    def close(self) -> None:
        for guest in self._shared.values():
            guest.close()
        self._shared.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
