"""The boot cache: a directory of snapshots of guests at their ready point, one per key.

``pykvm run -- CMD`` keeps its entries in ``${PYKVM_CACHE:-~/.cache/pykvm}/boots``
(:func:`default_root`); the pytest plugin keeps its own in ``.../snapshots``. An
entry is a directory named by the key (pykvm/warm/guest.py: GuestSpec.key) holding a
snapshot (state.json, memory.bin: pykvm/snapshot) and two files of its own:
``entry.json`` (the configuration, for ``pykvm cache list``) and
``boot-console.log`` (the cold boot's console, for failure reports).

Concurrency (several ``pykvm run`` of one configuration at once): an entry is
written whole into a fresh directory of its own (``tempfile.mkdtemp``: a new name,
mode 0700, created with O_EXCL semantics) and renamed to its key while the cache's
lock file is held exclusively; a run that finds the key taken by then throws its
copy away. Restores hold the lock shared, so ``clear`` and eviction never remove an
entry from under one. Entries are never written in place, so a reader sees a
complete entry or none.

Size: the entries' allocated bytes (memory.bin is sparse) are kept under a cap,
``$PYKVM_BOOT_CACHE_MAX`` (a size like ``2G``; default :data:`DEFAULT_CAP`), by
removing the least recently used entries (an entry's mtime is its last use) after
each new one; the newest entry is always kept.

The cache directory must be this user's and writable by no one else (it is created
0700): another local user who could write there could plant an entry for us to
restore.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BootCacheError, ConfigError

DEFAULT_CAP = 2 << 30
CAP_ENV = "PYKVM_BOOT_CACHE_MAX"
LOCK_NAME = ".lock"
ENTRY_FILE = "entry.json"
BOOT_LOG = "boot-console.log"
STATE_FILE = "state.json"           # pykvm/snapshot/document.py's; present iff complete
MAX_ENTRY_JSON = 64 * 1024
STALE_SCRATCH_SECONDS = 24 * 3600   # a scratch directory a killed run left behind
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def default_root() -> Path:
    """Where ``pykvm run`` keeps its booted guests."""
    cache = os.environ.get("PYKVM_CACHE") or Path.home() / ".cache" / "pykvm"
    return Path(cache) / "boots"


def configured_cap() -> int:
    """``$PYKVM_BOOT_CACHE_MAX`` in bytes (ConfigError when it is not a size)."""
    text = os.environ.get(CAP_ENV)
    if not text:
        return DEFAULT_CAP
    from ..machine import parse_size

    try:
        return parse_size(text) if text.strip() != "0" else 0
    except ConfigError as error:
        raise ConfigError(f"${CAP_ENV}: {error}") from None


@dataclass
class Entry:
    """One cached boot, as ``pykvm cache list`` shows it."""

    path: Path
    key: str
    size: int                   # bytes allocated on disk
    created: float              # when the boot was cached (entry.json, else ctime)
    last_used: float            # mtime: touched by every restore
    config: dict                # entry.json's "config" ({} when unreadable)
    pykvm_version: str = "?"

    def describe(self) -> str:
        """One line: the kernel, the machine, the command line."""
        from ..machine import format_size

        c = self.config
        if not c:
            return "(no entry.json)"
        mem = format_size(c["mem"]) if isinstance(c.get("mem"), int) else "?"
        parts = [f"{Path(str(c.get('kernel'))).name}", f"{mem}", f"{c.get('cpus', '?')} vCPU"]
        if c.get("initrd"):
            parts.insert(1, Path(str(c["initrd"])).name)
        if c.get("console", "serial") != "serial":
            parts.append(f"console={c['console']}")
        if c.get("rng"):
            parts.append("rng")
        if c.get("append"):
            parts.append(f"append={c['append']!r}")
        return ", ".join(parts) + f" (pykvm {self.pykvm_version})"


class BootCache:
    """The entries under ``root``, at most ``cap`` bytes of them (None: no byte cap)
    and at most ``max_entries`` (None: no count cap)."""

    def __init__(self, root: Path, cap: int | None = DEFAULT_CAP, max_entries: int | None = None):
        self.root = Path(root)
        self.cap = cap
        self.max_entries = max_entries

    # --- the directory and its lock ------------------------------------------------------------
    def ensure_root(self) -> None:
        """Create the cache directory (0700) if needed, and check it is safely ours."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self.root)
        except OSError as error:
            raise BootCacheError(f"{self.root}: cannot create the boot cache: "
                                 f"{error.strerror}") from None
        if not stat.S_ISDIR(info.st_mode):
            raise BootCacheError(f"{self.root}: not a directory (a symbolic link?): the boot "
                                 f"cache must be a real directory of yours")
        if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BootCacheError(f"{self.root}: must belong to you and be writable by no one "
                                 f"else (uid {info.st_uid}, mode "
                                 f"{stat.S_IMODE(info.st_mode):04o})")

    def digest_memo(self):
        """The file digests this cache remembers (pykvm/warm/digests.py; GuestSpec.key
        saves what it adds); a cache directory that is not safely ours remembers nothing."""
        from .digests import MEMO_NAME, DigestMemo

        try:
            self.ensure_root()
        except BootCacheError:
            return DigestMemo(None)         # the run says why when it looks an entry up
        return DigestMemo.load(self.root / MEMO_NAME)

    @contextlib.contextmanager
    def locked(self, exclusive: bool):
        """The cache's lock file held shared (restoring) or exclusive (changing)."""
        self.ensure_root()
        try:
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise BootCacheError(f"{self.root / LOCK_NAME}: cannot open the lock: "
                                 f"{error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    # --- entries ---------------------------------------------------------------------------------
    def lookup(self, key: str) -> Path | None:
        """The complete entry for ``key``, or None."""
        path = self.root / key
        try:
            info = os.lstat(path / STATE_FILE)
        except OSError:
            return None
        return path if stat.S_ISREG(info.st_mode) and not os.path.islink(path) else None

    def touch(self, path: Path) -> None:
        """Mark ``path`` as just used (least-recently-used eviction reads this)."""
        with contextlib.suppress(OSError):
            os.utime(path, follow_symlinks=False)

    def store(self, machine, key: str, config: dict, boot_log: bytes) -> Path:
        """Snapshot ``machine`` (running, at its ready point) as the entry for ``key``.
        Returns the entry; when another run stored one meanwhile, that one (this copy is
        thrown away). Evicts what the cap leaves no room for. SnapshotError or
        BootCacheError when the entry cannot be written."""
        from .. import __version__
        from ..snapshot import save_snapshot

        self.ensure_root()
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
        try:
            save_snapshot(machine, scratch)
            about = {"key": key, "created": time.time(), "pykvm_version": __version__,
                     "config": config}
            write_new(scratch, ENTRY_FILE, json.dumps(about, indent=1).encode() + b"\n")
            write_new(scratch, BOOT_LOG, boot_log)
            final = self.root / key
            with self.locked(exclusive=True):
                if os.path.lexists(final):
                    return final            # another run's: keep theirs
                try:
                    os.rename(scratch, final)
                except OSError as error:
                    raise BootCacheError(f"{final}: cannot put the entry in place: "
                                         f"{error.strerror}") from None
                self._evict(keep=final)
            return final
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)

    def drop(self, path: Path) -> None:
        """Remove the entry ``path`` (it failed to restore)."""
        with self.locked(exclusive=True):
            _remove(path)

    def entries(self) -> list[Entry]:
        """The complete entries, most recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or self.lookup(path.name) is None:
                continue
            info = path.stat()
            about = read_entry_json(path)
            config = about.get("config") if isinstance(about.get("config"), dict) else {}
            created = about.get("created")
            found.append(Entry(path, path.name, allocated(path),
                               created if isinstance(created, (int, float)) else info.st_ctime,
                               info.st_mtime, config, str(about.get("pykvm_version", "?"))[:40]))
        return sorted(found, key=lambda entry: entry.last_used, reverse=True)

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and scratch directories); returns (entries, bytes)."""
        if not self.root.is_dir():
            return 0, 0
        count = freed = 0
        with self.locked(exclusive=True):
            for path in self.root.iterdir():
                if path.name == LOCK_NAME or path.is_symlink() or not path.is_dir():
                    continue
                freed += allocated(path)
                count += not path.name.startswith(".")
                _remove(path)
        return count, freed

    def evict(self, keep: Path | None = None) -> list[Path]:
        with self.locked(exclusive=True):
            return self._evict(keep)

    def _evict(self, keep: Path | None) -> list[Path]:
        """Least recently used entries past the caps (``keep`` stays); the lock is held."""
        removed, total = [], 0
        # ``keep`` counts first: the others fit in what it leaves, most recent first
        ordered = sorted(self.entries(), key=lambda entry: entry.path != keep)
        for index, entry in enumerate(ordered):
            total += entry.size
            over = (self.cap is not None and total > self.cap) or \
                (self.max_entries is not None and index >= self.max_entries)
            if over and entry.path != keep:
                _remove(entry.path)
                removed.append(entry.path)
                total -= entry.size
        now = time.time()
        for path in self.root.iterdir():
            with contextlib.suppress(OSError):
                if path.name.startswith(".") and path.name != LOCK_NAME and \
                        now - path.lstat().st_mtime > STALE_SCRATCH_SECONDS:
                    _remove(path)
        return removed


def write_new(directory: Path, name: str, data: bytes) -> None:
    """``directory/name``, a new file (O_EXCL|O_NOFOLLOW, 0600) in a directory of ours."""
    try:
        fd = os.open(directory / name, NEW_FILE, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as error:
        raise BootCacheError(f"{directory / name}: cannot write: {error.strerror}") from None


def read_entry_json(path: Path) -> dict:
    """entry.json of ``path`` ({} when missing, not a regular file, too big or damaged)."""
    try:
        fd = os.open(path / ENTRY_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        data = os.read(fd, MAX_ENTRY_JSON + 1)
    finally:
        os.close(fd)
    try:
        about = json.loads(data) if len(data) <= MAX_ENTRY_JSON else {}
    except ValueError:
        return {}
    return about if isinstance(about, dict) else {}


def allocated(path: Path) -> int:
    """Bytes the files directly in ``path`` take on disk (entries hold no subdirectories)."""
    total = 0
    with contextlib.suppress(OSError):
        for child in os.scandir(path):
            with contextlib.suppress(OSError):
                total += child.stat(follow_symlinks=False).st_blocks * 512
    return total


def _remove(path: Path) -> None:
    """Remove an entry: renamed out of the way first, so no reader finds half of it."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    doomed = path.with_name(f".doomed-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)

