"""Files between the host and the guest agent: the file requests of
:class:`~pykvm.agent.client.AgentClient` (PUT_FILE, GET_FILE, and directories as tar
streams through ``exec``), and the host files they create.

The guest is hostile. What it sends is streamed to disk and bounded; a file is
written under a new name in its directory (O_CREAT|O_EXCL|O_NOFOLLOW relative to the
directory's fd) and renamed over the destination, so a planted symlink is replaced,
never followed; modes are the host user's (:func:`host_mode`), never the guest's
setuid/setgid/sticky bits or owners; a tar stream's members that would land outside
the destination are refused (tarfile's "data" filter).
"""

from __future__ import annotations

import errno as errno_module
import io
import os
import posixpath
import shlex
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from .errors import GuestFileError, InvalidRequest
from .protocol import DATA, DEFAULT_READY_TIMEOUT, GET_FILE, PUT_FILE, data_frames, frame


class FileRequests:
    """The file half of AgentClient (a mixin: it uses the client's request table,
    ``_new``/``_send``/``_answer``/``_forget``, and its ``exec``, ``wait_ready``,
    ``max_output`` and ``max_file``)."""

    # --- files -------------------------------------------------------------------------------------------
    def put_file(self, guest_path: str, data: bytes, mode: int = 0o644, *,
                 timeout: float | None = 600, ready_timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Write ``data`` to ``guest_path`` (replaced whole, created with ``mode``)."""
        path = _guest_path(guest_path)
        self.wait_ready(ready_timeout)
        request_id, request = self._new(PUT_FILE)
        try:
            self._send(frame(PUT_FILE, request_id, struct.pack("<I", mode & 0o7777)
                             + path.encode() + b"\0"),
                       *data_frames(DATA, request_id, data, end=True))
            self._answer(request, timeout, f"writing {path}",
                         f"writing {path} in the guest took more than", GuestFileError, f"{path}: ")
        finally:
            self._forget(request_id)

    def get_file(self, guest_path: str, *, timeout: float | None = 600,
                 ready_timeout: float = DEFAULT_READY_TIMEOUT,
                 limit: int | None = None) -> tuple[bytes, int]:
        """(content, mode) of the guest's regular file ``guest_path``: at most ``limit``
        bytes (default ``max_output``), else GuestFileError (EFBIG). The mode is what the
        guest says: never apply it to a host file as it is (see :func:`host_mode`)."""
        content = io.BytesIO()
        mode = self.get_file_into(guest_path, content, timeout=timeout,
                                  ready_timeout=ready_timeout,
                                  limit=self.max_output if limit is None else limit)
        return content.getvalue(), mode

    def get_file_into(self, guest_path: str, sink: BinaryIO, *, timeout: float | None = 600,
                      ready_timeout: float = DEFAULT_READY_TIMEOUT,
                      limit: int | None = None) -> int:
        """Write the guest's regular file ``guest_path`` to ``sink`` as it arrives (at most
        ``limit`` bytes, default ``max_file``); returns the mode the guest reports."""
        path = _guest_path(guest_path)
        self.wait_ready(ready_timeout)
        request_id, request = self._new(GET_FILE, sink=sink,
                                        limit=self.max_file if limit is None else limit)
        try:
            self._send(frame(GET_FILE, request_id, path.encode() + b"\0"))
            self._answer(request, timeout, f"reading {path}",
                         f"reading {path} from the guest took more than", GuestFileError,
                         f"{path}: ")
            mode, _ = request.info or (0o644, 0)
            return mode & 0o7777
        finally:
            self._forget(request_id)

    # --- files and directories from and to the host -----------------------------------------------
    def copy_in(self, host_path, guest_path: str, *, timeout: float | None = 600) -> None:
        """Copy the host file or directory ``host_path`` to ``guest_path``. A directory
        goes as a tar stream unpacked by the guest's tar (busybox) into ``guest_path``
        (created if missing): one command, whatever the number of files."""
        source = Path(host_path)
        if source.is_dir():
            archive = io.BytesIO()
            with tarfile.open(fileobj=archive, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for child in sorted(source.iterdir()):
                    tar.add(str(child), arcname=child.name)
            target = shlex.quote(_guest_path(guest_path))
            self.exec(f"mkdir -p {target} && tar -xf - -C {target}", stdin=archive.getvalue(),
                      timeout=timeout, check=True)
            return
        try:
            data = source.read_bytes()
            mode = source.stat().st_mode & 0o7777
        except OSError as error:
            raise GuestFileError(f"{source}: {error.strerror}", error.errno) from None
        self.put_file(guest_path, data, mode, timeout=timeout)

    def copy_out(self, guest_path: str, host_path, *, timeout: float | None = 600,
                 limit: int | None = None) -> None:
        """Copy the guest's file or directory ``guest_path`` to ``host_path``. A directory
        comes as a tar stream from the guest's tar; members that would land outside
        ``host_path`` (absolute paths, ``..``, links out) are refused.

        The guest is hostile: what it sends is streamed to disk and bounded (``limit``
        bytes, default ``max_file``: for a directory, of its tar stream); a file is
        written under a new name in its directory (O_EXCL|O_NOFOLLOW, relative to the
        directory's fd) and renamed over ``host_path``, so a symlink planted there is
        replaced, never followed; modes are the host user's (:func:`host_mode`), never
        the guest's setuid/setgid/sticky bits or owners."""
        path = _guest_path(guest_path)
        limit = self.max_file if limit is None else limit
        target = Path(host_path)
        destination = target / posixpath.basename(path.rstrip("/")) if target.is_dir() \
            else target
        try:
            with NewHostFile(destination) as new:
                mode = self.get_file_into(path, new, timeout=timeout, limit=limit)
                new.commit(mode)
            return
        except GuestFileError as error:
            if error.errno != errno_module.EISDIR:
                raise
        with tempfile.TemporaryFile() as archive:
            self.exec(["tar", "-cf", "-", "-C", path, "."], timeout=timeout, check=True,
                      stdout_sink=archive, limit=limit)
            archive.seek(0)
            try:
                target.mkdir(parents=True, exist_ok=True)
                with tarfile.open(fileobj=archive, mode="r") as tar:
                    tar.extractall(str(target), filter=_host_member)
            except (OSError, tarfile.TarError) as error:
                raise GuestFileError(f"{target}: {getattr(error, 'strerror', None) or error}",
                                     getattr(error, "errno", 0) or 0) from None


class NewHostFile:
    """A host file created for what the guest sends: written under a temporary name in
    the destination's directory (opened as a directory fd; the name created with
    O_CREAT|O_EXCL|O_NOFOLLOW), then renamed over the destination by :meth:`commit`, or
    removed. Nothing is created before the first :meth:`write` or the commit (a guest
    path that turns out to be a directory leaves no trace). Use as a context manager."""

    def __init__(self, destination: Path):
        self.destination = destination
        self.dir_fd = -1
        self.temporary: str | None = None
        self.file: BinaryIO | None = None

    def _create(self) -> None:
        self.dir_fd = os.open(self.destination.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.temporary = f".{self.destination.name}.{os.urandom(6).hex()}.pykvm-part"
        fd = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self.file is None:
            self._create()
        self.file.write(data)

    def commit(self, guest_mode: int) -> None:
        """Give the file the host user's mode (:func:`host_mode`) and its real name."""
        try:
            if self.file is None:
                self._create()
            self.file.flush()
            os.fchmod(self.file.fileno(), host_mode(guest_mode))
            self.file.close()
            os.rename(self.temporary, self.destination.name, src_dir_fd=self.dir_fd,
                      dst_dir_fd=self.dir_fd)
        except OSError as error:
            raise GuestFileError(f"{self.destination}: {error.strerror}", error.errno) from None
        self.temporary = None

    def __enter__(self) -> "NewHostFile":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        if self.temporary is not None:
            try:
                os.unlink(self.temporary, dir_fd=self.dir_fd)
            except OSError:
                pass
        if self.dir_fd >= 0:
            os.close(self.dir_fd)


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask() sets it, and another
    thread may create a file meanwhile): /proc/self/status has it since Linux 4.7."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def host_mode(guest_mode: int, directory: bool = False) -> int:
    """The host mode for a file the guest sent with ``guest_mode``: the user's own
    (0666, or 0777 when the guest marked it executable, or for a directory, less the
    umask). Setuid, setgid and sticky bits, and the guest's idea of who may read or
    write it, are not the guest's to decide on the host."""
    executable = directory or guest_mode & 0o111
    return (0o777 if executable else 0o666) & ~current_umask()


def _host_member(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (no paths or links outside, no devices, no owners), and
    modes from :func:`host_mode`."""
    member = tarfile.data_filter(member, destination)
    if member.mode is None:
        return member
    return member.replace(mode=host_mode(member.mode, member.isdir()), deep=False)


def _guest_path(path: str) -> str:
    path = str(path)
    if not path or "\0" in path:
        raise InvalidRequest(f"{path!r} is not a guest path")
    return path
