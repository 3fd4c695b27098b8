"""File digests remembered across runs by what ``stat`` says about the files.

The boot cache's key (guest.py: ``GuestSpec.key``) covers the kernel's bytes (17 MiB for
the default guest's vmlinux), the initramfs and pykvm's own source, so every
``pykvm run -- CMD`` hashed ~20 MiB before it could look anything up: 0.07 s at load 6
of a warm run that is about a second in all. A :class:`DigestMemo` keeps, in the boot
cache's directory, each file's SHA-256 next to its device, inode, size, mtime and
ctime, and hashes a file again only when one of them moved.

Why that is enough: a write to a file moves its ctime to the current time, and nothing
sets a ctime back (``utime`` can fake an mtime, not a ctime; only changing the system
clock could). The one gap is a change in the same clock tick as the hashing that the
memo recorded (git's "racily clean" files): a file whose ctime is less than
:data:`RACY_SECONDS` old when it is hashed is not remembered. The memo lives in the
cache directory that BootCache.ensure_root checks is the user's own and writable by
no one else, and it is read bounded and checked field by field: a damaged memo only
makes the run hash the files again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

MEMO_NAME = ".digests.json"     # a dot name: BootCache's listing and eviction skip it
MAX_MEMO = 256 * 1024
MAX_FILES = 64                  # kernels, initramfs images and source trees remembered
RACY_SECONDS = 2.0
CHUNK = 1 << 20


def signature(info: os.stat_result) -> list[int]:
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def hash_file(path: str) -> tuple[str, os.stat_result]:
    """SHA-256 of the file's bytes (hex), and its stat taken on the open file."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        digest = hashlib.sha256()
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest(), info


def recent(info: os.stat_result) -> bool:
    return time.time_ns() - info.st_ctime_ns < RACY_SECONDS * 1e9


@dataclass
class DigestMemo:
    """What ``path`` (None: nothing is remembered) remembers: a file's absolute path ->
    [signature..., hex digest]."""

    path: Path | None
    known: dict[str, list] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def load(cls, path: Path | None) -> "DigestMemo":
        memo = cls(path)
        if path is None:
            return memo
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return memo
        try:
            data = os.read(fd, MAX_MEMO + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        finally:
            os.close(fd)
        try:
            known = json.loads(data) if 0 < len(data) <= MAX_MEMO else {}
        except ValueError:
            known = {}
        if isinstance(known, dict):
            memo.known = {name: row for name, row in known.items() if valid_row(row)}
        return memo

    def file_digest(self, path: str) -> str:
        """SHA-256 (hex) of the file at ``path``: remembered, or hashed and remembered."""
        name = os.path.abspath(path)
        row = self.known.get(name)
        if row is not None:
            try:
                if signature(os.stat(name)) == row[:-1]:
                    return row[-1]
            except OSError:
                pass
        digest, info = hash_file(name)
        self.remember(name, info, digest)
        return digest

    def tree_digest(self, name: str, files: list[tuple[str, Path]], compute) -> str:
        """A digest over ``files`` ((relative name, path) pairs) that ``compute(files)``
        makes, remembered under ``name`` with a signature over every file's stat."""
        summary = hashlib.sha256()
        newest = 0
        for relative, path in files:
            info = os.stat(path)
            newest = max(newest, info.st_ctime_ns)
            summary.update(f"{relative}\0{signature(info)}\0".encode())
        stamp = summary.hexdigest()
        row = self.known.get(name)
        if row is not None and row[:-1] == [0, 0, 0, 0, stamp]:
            return row[-1]
        digest = compute(files)
        if time.time_ns() - newest >= RACY_SECONDS * 1e9:
            self.known[name] = [0, 0, 0, 0, stamp, digest]
            self.changed = True
        return digest

    def remember(self, name: str, info: os.stat_result, digest: str) -> None:
        if self.path is None or recent(info):
            return
        self.known[name] = signature(info) + [digest]
        self.changed = True

    def save(self) -> None:
        """Write the memo (a new file renamed over the old one) when it changed; a
        memo that cannot be written is only a slower next run."""
        if self.path is None or not self.changed:
            return
        rows = dict(list(self.known.items())[-MAX_FILES:])
        data = json.dumps(rows).encode()
        scratch = self.path.with_name(f"{MEMO_NAME}.{os.getpid()}")
        try:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(scratch, self.path)
        except OSError:
            try:
                os.unlink(scratch)
            except OSError:
                pass


def valid_row(row) -> bool:
    """[dev, ino, size, mtime_ns, ctime_ns, 64 hex digits] (a tree's: four 0s, a stamp)."""
    return isinstance(row, list) and len(row) == 6 and \
        all(isinstance(v, int) for v in row[:4]) and \
        all(isinstance(v, (int, str)) for v in row[4:5]) and \
        isinstance(row[5], str) and len(row[5]) == 64
