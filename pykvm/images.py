"""Reading the files a user hands pykvm (kernels, initrds, flat binaries), with one clear
error per way it can fail, and a bound on every read.

Why bounded: a path is only a name. ``--kernel /dev/zero`` never ends, a FIFO blocks
until someone writes, and a sparse 20 GiB ``--flat`` file reads as 20 GiB of zeros. So
the file is opened without blocking (``O_NONBLOCK``: opening a FIFO for reading would
wait for a writer), its type and size are taken from ``fstat`` of that very descriptor
(not a ``stat`` of the path, which another process may swap in between), and the read
stops one byte past the limit whatever ``fstat`` said (a file may grow while it is read).
A compressed kernel payload is bounded the same way (:data:`MAX_VMLINUX_SIZE`).
"""

from __future__ import annotations

import os
import stat

from .errors import ImageError

MiB = 1 << 20

# The largest file pykvm reads for each role. A bzImage is tens of MiB; an initramfs a
# few hundred at most; a flat binary is a tutorial program. Guest RAM bounds them all
# again when they are placed.
IMAGE_LIMITS = {"kernel": 256 * MiB, "initrd": 1024 * MiB, "flat binary": 256 * MiB}
DEFAULT_LIMIT = 256 * MiB
# The largest ELF vmlinux a bzImage payload may decompress to (distribution kernels are
# ~60 MiB): a payload that expands further is a decompression bomb, not a kernel.
MAX_VMLINUX_SIZE = 512 * MiB


def format_bytes(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB and not size % MiB else f"{size} bytes"


def read_image_file(path: str | os.PathLike, what: str = "kernel",
                    limit: int | None = None) -> bytes:
    """The whole content of the regular file ``path`` (at most ``limit`` bytes, by default
    :data:`IMAGE_LIMITS` for ``what``), or an ImageError naming the file and the problem."""
    name = os.fspath(path)
    limit = IMAGE_LIMITS.get(what, DEFAULT_LIMIT) if limit is None else limit
    with _open_checked(name, what, limit) as image:
        try:
            data = _read_at_most(image.fileno(), limit + 1)
        except OSError as error:
            raise ImageError(f"{name}: cannot read {what} image: {error.strerror}") from None
    if len(data) > limit:
        raise ImageError(f"{name}: {what} image grew past {format_bytes(limit)} while it was read")
    if not data:
        raise ImageError(f"{name}: {what} image is empty")
    return data


def read_image_head(path: str | os.PathLike, count: int, what: str = "kernel") -> bytes:
    """The first ``count`` bytes (fewer if the file is shorter) of the regular file
    ``path``, checked as :func:`read_image_file` checks it: for a look at a header before
    the whole image is read (a bzImage's version string), which must not block on a FIFO
    or read a device."""
    name = os.fspath(path)
    with _open_checked(name, what, IMAGE_LIMITS.get(what, DEFAULT_LIMIT)) as image:
        try:
            return _read_at_most(image.fileno(), count)
        except OSError as error:
            raise ImageError(f"{name}: cannot read {what} image: {error.strerror}") from None


def _open_checked(name: str, what: str, limit: int):
    """``name`` opened for reading, once the descriptor's own fstat shows a regular file of
    at most ``limit`` bytes; blocking again, so that reads wait for the disk."""
    try:
        image = open(name, "rb", buffering=0, opener=_open_nonblocking)
    except FileNotFoundError:
        raise ImageError(f"{name}: {what} image not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not a {what} image") from None
    except PermissionError:
        raise ImageError(f"{name}: {what} image is not readable (permission denied)") from None
    except OSError as error:
        raise ImageError(f"{name}: cannot open {what} image: {error.strerror}") from None
    try:
        info = os.fstat(image.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{name}: is a {_file_kind(info.st_mode)}, not a regular "
                             f"file: a {what} image must be one")
        if info.st_size > limit:
            raise ImageError(f"{name}: {what} image of {info.st_size} bytes is larger "
                             f"than pykvm accepts ({format_bytes(limit)})")
        os.set_blocking(image.fileno(), True)
    except OSError as error:
        image.close()
        raise ImageError(f"{name}: cannot read {what} image: {error.strerror}") from None
    except ImageError:
        image.close()
        raise
    return image


def _open_nonblocking(path: str, flags: int) -> int:
    """Opening a FIFO for reading blocks until a writer comes: never wait for one."""
    return os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)


def _read_at_most(fd: int, count: int) -> bytes:
    chunks = []
    while count > 0:
        chunk = os.read(fd, min(count, 8 * MiB))
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def too_big_payload(name: str, kind: str) -> ImageError:
    """The error for a kernel payload that decompresses past :data:`MAX_VMLINUX_SIZE`."""
    return ImageError(f"{name}: the {kind} kernel payload decompresses to more than "
                      f"{format_bytes(MAX_VMLINUX_SIZE)} (not a kernel: refused)")
