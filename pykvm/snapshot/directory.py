"""The snapshot directory as a place other local users cannot redirect writes from.

A snapshot writes guest RAM and the machine's state to files. Written by path, as
``open(DIR/memory.bin, O_CREAT|O_TRUNC)``, every write follows whatever another user
planted at that path: a symlink ``DIR/memory.bin -> /etc/shadow`` (or ``DIR`` itself
pointing elsewhere) would have pykvm overwrite a victim file with guest memory. So,
as the usual rules for files in shared directories go (``open(2)`` O_NOFOLLOW and
O_EXCL, ``openat(2)``, ``rename(2)``; OpenSSH's StrictModes for the ownership checks):

* the parent directory is opened once and checked through its fd: it belongs to this
  user or to root, and if others may write to it, it has the sticky bit (``/tmp``),
  so nobody else can rename or remove what pykvm creates in it;
* the snapshot directory is created with mode 0700 relative to that fd; one that
  exists already must not be a symlink (O_NOFOLLOW), must be this user's, writable
  by nobody else, and empty or holding only a previous snapshot (regular files named
  state.json and memory.bin, replaced, never written through);
* every file is created relative to the directory's fd with O_CREAT|O_EXCL|O_NOFOLLOW
  under a temporary name, written, fsync'ed, and renamed to its final name through
  the same fd (``renameat``), then the directory is fsync'ed: the final name always
  names either the old file or the complete new one.

Every refusal is a :class:`SnapshotError` of one line.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .state import SnapshotError

TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name(name: str) -> str:
    return f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"


class SnapshotDirectory:
    """A snapshot directory opened for writing ``names`` (the files of a snapshot)
    into it; use as a context manager (it closes its fds)."""

    def __init__(self, path, names: tuple[str, ...]):
        self.path = Path(path)
        self.names = names
        self.fd = -1
        parent_fd = open_parent(self.path)
        try:
            self.fd = open_snapshot_dir(parent_fd, self.path)
        finally:
            os.close(parent_fd)
        try:
            self._check_contents()
        except BaseException:
            self.close()
            raise

    def _check_contents(self) -> None:
        allowed = set(self.names)
        temps = {temp_name(name) for name in self.names}
        others = []
        for entry in os.listdir(self.fd):
            if entry in temps:     # left by a snapshot that failed: ours (the dir is private)
                os.unlink(entry, dir_fd=self.fd)
            elif entry not in allowed:
                others.append(entry)
            elif not stat.S_ISREG(os.stat(entry, dir_fd=self.fd, follow_symlinks=False).st_mode):
                raise SnapshotError(f"{self.path / entry}: not a regular file (a symbolic "
                                    f"link?): a previous snapshot holds none; refusing")
        if others:
            raise SnapshotError(f"{self.path}: not empty (holds {', '.join(sorted(others)[:3])}"
                                f"{', ...' if len(others) > 3 else ''}): give a new directory "
                                f"or one holding only a previous snapshot")

    def create(self, name: str) -> int:
        """A new file for ``name`` under its temporary name (O_EXCL|O_NOFOLLOW, mode 0600)."""
        try:
            return os.open(temp_name(name), FILE_FLAGS, 0o600, dir_fd=self.fd)
        except OSError as error:
            raise SnapshotError(f"{self.path / temp_name(name)}: cannot create: "
                                f"{error.strerror}") from None

    def discard(self, name: str) -> None:
        """Remove ``name``'s temporary file, if a failed snapshot left it."""
        try:
            os.unlink(temp_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def publish(self, name: str) -> None:
        """Rename ``name``'s temporary file to ``name`` (atomically; an old file of that
        name, or anything else there, is replaced, never followed), and make it durable."""
        try:
            os.rename(temp_name(name), name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            os.fsync(self.fd)
        except OSError as error:
            raise SnapshotError(f"{self.path / name}: cannot put in place: "
                                f"{error.strerror}") from None

    def allocated(self, name: str) -> int:
        """Bytes ``name`` takes on disk."""
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SnapshotDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_parent(path: Path) -> int:
    """The fd of ``path``'s parent, checked: this user's or root's, and not writable by
    others unless sticky. (The user's own path may go through symlinks; what counts is
    the directory the fd ends up on.)"""
    parent = path.parent
    try:
        fd = os.open(parent, DIR_FLAGS)
    except OSError as error:
        raise SnapshotError(f"{parent}: cannot open the directory to create the snapshot "
                            f"in: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid not in (os.geteuid(), 0):
            raise SnapshotError(f"{parent}: belongs to another user (uid {info.st_uid}): "
                                f"a snapshot is not written into another user's directory")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise SnapshotError(f"{parent}: writable by other users and not sticky "
                                f"(mode {stat.S_IMODE(info.st_mode):04o}): they could redirect "
                                f"the snapshot's files; use a directory only you can write")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_snapshot_dir(parent_fd: int, path: Path) -> int:
    """The fd of the snapshot directory ``path.name`` in ``parent_fd``: created (0700),
    or an existing one that is a real directory, this user's, and private."""
    name = path.name
    if name in ("", ".", ".."):
        raise SnapshotError(f"{path}: give the snapshot directory by name")
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    except OSError as error:
        raise SnapshotError(f"{path}: cannot create the snapshot directory: "
                            f"{error.strerror}") from None
    try:
        fd = os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            link = stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
            kind = "a symbolic link" if link else "not a directory"
            raise SnapshotError(f"{path}: {kind}: a snapshot is written only into a real "
                                f"directory of yours") from None
        raise SnapshotError(f"{path}: cannot open the snapshot directory: "
                            f"{error.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise SnapshotError(f"{path}: belongs to another user (uid {info.st_uid})")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SnapshotError(f"{path}: writable by other users (mode "
                                f"{stat.S_IMODE(info.st_mode):04o}): make it 0700 or give "
                                f"a new directory")
    except BaseException:
        os.close(fd)
        raise
    return fd
