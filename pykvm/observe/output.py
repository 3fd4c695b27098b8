"""The files observe/ writes for the user: a trace (--trace FILE), a plot (--stats-plot).

They are often put in a shared directory such as /tmp, where another local user
may have planted a symlink under the name to make pykvm overwrite one of the
caller's files. So the file is opened relative to its directory's fd with
O_NOFOLLOW (open(2): a symlink as the last component fails with ELOOP) and must
be a regular file or a FIFO (a reader streaming the trace), never a device.
It is truncated, not refused, when it exists: rerunning with the same --trace
FILE is the common case. New files get mode 0644 less the umask.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import ConfigError

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def create(path: str | Path, option: str, mode: str = "w"):
    """``path`` opened for writing (text, line-buffered, for ``mode`` 'w'; bytes for
    'wb'); ConfigError naming ``option`` when it cannot be."""
    path = Path(path)
    try:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"{option} {path}: cannot open its directory: {error.strerror}") from None
    try:
        fd = os.open(path.name, _FLAGS, 0o644, dir_fd=directory)
    except OSError as error:
        why = {errno.ELOOP: "it is a symbolic link",
               errno.ENXIO: "it is a FIFO that nobody reads"}.get(error.errno, error.strerror)
        raise ConfigError(f"{option} {path}: cannot write it: {why}") from None
    finally:
        os.close(directory)
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
            raise ConfigError(f"{option} {path}: not a regular file")
        if stat.S_ISREG(info.st_mode):
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        if mode == "wb":
            return os.fdopen(fd, "wb")
        return os.fdopen(fd, "w", buffering=1)
    except BaseException:
        os.close(fd)
        raise
