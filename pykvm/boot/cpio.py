"""newc ("SVR4 with no CRC") cpio archives: the format of a Linux initramfs.

pykvm writes them in two places: the default guest's builder packs the whole
initramfs, and at run time pykvm appends a tiny second archive carrying
``/pykvm/cmd`` (Linux unpacks concatenated archives one after the other).

The output is deterministic: every entry gets mtime 0, uid/gid 0 and an inode
number from a counter, and a host tree is walked in sorted order, so the same
input always gives the same bytes.

Layout of one entry (see the kernel's Documentation/driver-api/early-userspace/
buffer-format.rst): a 110-byte ASCII header of "070701" and 13 eight-digit hex
fields, the NUL-terminated name, padding to a multiple of 4, the data, padding
to a multiple of 4. An entry named ``TRAILER!!!`` ends the archive.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from pykvm.errors import ImageError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
           "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
_FIELD_MAX = 0xFFFFFFFF  # each field is 8 hex digits


def _pad4(length: int) -> int:
    """Bytes of NUL padding that bring ``length`` to a multiple of 4."""
    return -length % 4


@dataclass(frozen=True)
class Entry:
    """One archive member, as written or as read back."""

    name: str           # relative path inside the archive, e.g. "bin/busybox"
    mode: int           # st_mode: file type bits | permission bits
    data: bytes = b""   # file contents, or a symlink's target
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _clean_name(name: str) -> str:
    """The archive form of a path: relative, no '.'/'..' parts, no NUL."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\0" in name:
        raise ImageError(f"cpio: unusable member name {name!r}")
    return "/".join(parts)


class CpioWriter:
    """Writes a newc archive to a binary stream, entry by entry.

    Parent directories are emitted automatically (mode 0755) before the first
    member inside them, because the kernel's unpacker does not create missing
    parents. ``close()`` (or leaving the ``with`` block) writes the trailer.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._next_ino = 1
        self._dirs: set[str] = set()
        self._names: set[str] = set()
        self._closed = False

    def __enter__(self) -> "CpioWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    # --- typed helpers -------------------------------------------------------
    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self.add(Entry(name, stat.S_IFDIR | perm))

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(Entry(name, stat.S_IFREG | perm, bytes(data)))

    def add_symlink(self, name: str, target: str) -> None:
        self.add(Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self.add(Entry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor))

    def add_tree(self, host_dir: str | os.PathLike, prefix: str = "") -> None:
        """Add everything below ``host_dir`` (sorted; owners and times are not kept).

        Hard links become independent copies; sockets are skipped.
        """
        root = Path(host_dir)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            for name in sorted(dirnames + filenames):
                path = here / name
                rel = path.relative_to(root).as_posix()
                self._add_host_path(path, f"{prefix}/{rel}" if prefix else rel)

    def _add_host_path(self, path: Path, name: str) -> None:
        st = path.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            self.add_dir(name, perm)
        elif stat.S_ISREG(st.st_mode):
            self.add_file(name, path.read_bytes(), perm)
        elif stat.S_ISLNK(st.st_mode):
            self.add_symlink(name, os.readlink(path))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            self.add(Entry(name, st.st_mode, rdev_major=os.major(st.st_rdev),
                           rdev_minor=os.minor(st.st_rdev)))
        # sockets have no meaning in an archive

    # --- the one writer ------------------------------------------------------
    def add(self, entry: Entry) -> None:
        if self._closed:
            raise ImageError("cpio: archive already closed")
        name = _clean_name(entry.name)
        if name in self._names:
            raise ImageError(f"cpio: duplicate member {name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._dirs:
            self.add_dir(parent)
        self._names.add(name)
        if entry.is_dir:
            self._dirs.add(name)
        self._write(name, entry.mode, entry.data, entry.rdev_major, entry.rdev_minor,
                    nlink=2 if entry.is_dir else 1)

    def close(self) -> None:
        if not self._closed:
            self._write(TRAILER, 0, b"", 0, 0, nlink=1, ino=0)
            self._closed = True

    def _write(self, name: str, mode: int, data: bytes, rdev_major: int, rdev_minor: int,
               nlink: int, ino: int | None = None) -> None:
        if ino is None:
            ino, self._next_ino = self._next_ino, self._next_ino + 1
        encoded = name.encode() + b"\0"
        values = dict(ino=ino, mode=mode, uid=0, gid=0, nlink=nlink, mtime=0,
                      filesize=len(data), devmajor=0, devminor=0, rdevmajor=rdev_major,
                      rdevminor=rdev_minor, namesize=len(encoded), check=0)
        for field, value in values.items():
            if not 0 <= value <= _FIELD_MAX:
                raise ImageError(f"cpio: {name!r}: {field} {value} does not fit the newc format")
        header = MAGIC + b"".join(b"%08X" % values[f] for f in _FIELDS)
        head = header + encoded
        self._stream.write(head + b"\0" * _pad4(len(head)))
        self._stream.write(data + b"\0" * _pad4(len(data)))


def build_archive(entries: Iterable[Entry] = (), tree: str | os.PathLike | None = None) -> bytes:
    """A whole archive in memory: ``tree`` (a host directory) first, then ``entries``."""
    buffer = io.BytesIO()
    with CpioWriter(buffer) as writer:
        if tree is not None:
            writer.add_tree(tree)
        for entry in entries:
            writer.add(entry)
    return buffer.getvalue()


COMMAND_PATH = "pykvm/cmd"


def command_archive(cmd: str) -> bytes:
    """The run-time archive that puts ``cmd`` at /pykvm/cmd, byte for byte.

    The default guest's /init finds it there and runs it with ``sh -c``.
    """
    return build_archive([Entry(COMMAND_PATH, stat.S_IFREG | 0o644, cmd.encode())])


def read_archive(data: bytes) -> Iterator[Entry]:
    """Parse a newc archive back (up to its trailer): for tests and inspection."""
    offset = 0
    while True:
        header = data[offset:offset + HEADER_SIZE]
        if len(header) < HEADER_SIZE or header[:6] != MAGIC:
            raise ImageError(f"cpio: no newc header at offset {offset}")
        fields = dict(zip(_FIELDS, (int(header[6 + 8 * i:14 + 8 * i], 16)
                                    for i in range(len(_FIELDS)))))
        name_start = offset + HEADER_SIZE
        name_end = name_start + fields["namesize"]
        if name_end > len(data) or data[name_end - 1] != 0:
            raise ImageError(f"cpio: bad name at offset {offset}")
        name = data[name_start:name_end - 1].decode()
        data_start = name_end + _pad4(name_end - offset)
        data_end = data_start + fields["filesize"]
        if data_end > len(data):
            raise ImageError(f"cpio: {name!r} runs past the end of the archive")
        if name == TRAILER:
            return
        yield Entry(name, fields["mode"], data[data_start:data_end],
                    fields["rdevmajor"], fields["rdevminor"])
        offset = data_end + _pad4(data_end - offset)
