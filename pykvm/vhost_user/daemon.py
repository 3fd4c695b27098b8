"""Back-end daemons pykvm runs itself: start, supervise, stop.

Two of them, both from Debian 12's qemu-system-common: virtiofsd
(/usr/lib/qemu/virtiofsd) for ``--share DIR``, and qemu-storage-daemon
(/usr/bin/qemu-storage-daemon) exporting a disk image as vhost-user-blk for
``--disk IMG.qcow2`` and ``--disk IMG,backend=vhost-user``
(:func:`start_storage_daemon`). Each daemon gets a private directory
made with mkdtemp (mode 0700, a fresh name: nobody else can put a socket or a
symlink where pykvm connects) holding its socket and its log. pykvm waits for
the socket to appear, then connects; virtiofsd serves that one connection and
exits when it ends. Once connected (:meth:`Daemon.connected`) the directory is
removed, its log kept open: nothing of it is left on disk even if pykvm is killed.
qemu-storage-daemon does not exit when its client hangs up (it listens again):
``exits_on_hangup`` is False for it, so closing does not wait for that, and it is
started with ``setpriv --pdeathsig KILL`` (from the main thread, which lives as long
as pykvm) so that a pykvm killed with SIGKILL does not leave it behind.

Every exit path stops it: the VM's close (which normal exit, SIGTERM, a guest
crash and a VMM error all reach) hangs up, gives the daemon a moment to exit by
itself (pykvm/vhost_user/device.py), then :meth:`Daemon.stop` sends SIGTERM, then
SIGKILL after a grace period, reaps it and removes the directory. If pykvm
itself is killed, the daemon sees its socket hang up and exits on its own.

Sandboxing: virtiofsd's own default (``-o sandbox=namespace``: new mount, PID
and network namespaces, pivot_root into the shared directory, seccomp). A
read-only share (``ro``) is enforced outside the guest's reach: the daemon runs
in a mount namespace of its own (``unshare --mount``) and serves a read-only bind
mount of the directory (made in its private directory, so that even ``/`` can be
served read-only), since this virtiofsd has no read-only option.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .protocol import VhostUserError

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
STORAGE_DAEMON = "/usr/bin/qemu-storage-daemon"
START_TIMEOUT = 10.0
STOP_GRACE = 3.0
LOG_TAIL = 4096

_READ_ONLY_WRAPPER = ('mkdir -- "$2" && mount --bind -- "$1" "$2" && '
                      'mount -o remount,bind,ro -- "$2" && shift 2 && exec "$@"')


def virtiofsd_path() -> str | None:
    """The virtiofsd binary, or None when it is not installed."""
    return VIRTIOFSD if os.access(VIRTIOFSD, os.X_OK) else None


def storage_daemon_path() -> str | None:
    """qemu-storage-daemon, or None when it is not installed."""
    return STORAGE_DAEMON if os.access(STORAGE_DAEMON, os.X_OK) else None


class Daemon:
    """One back-end process and its private directory; :meth:`stop` is idempotent."""

    def __init__(self, name: str, argv_for, *, pass_fds=(), exits_on_hangup: bool = True):
        """``argv_for(directory, socket_path)``: the command line, given the private
        directory and the socket path in it. ``pass_fds``: fds the daemon inherits
        (under the same numbers)."""
        self.name = name
        self.exits_on_hangup = exits_on_hangup
        self.directory = Path(tempfile.mkdtemp(prefix="pykvm-vhost-"))
        self.socket_path = str(self.directory / "backend.sock")
        self.log_path = self.directory / "daemon.log"
        self.process: subprocess.Popen | None = None
        self._log_fd = -1
        try:
            log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
            try:
                argv = argv_for(self.directory, self.socket_path)
                self.process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                    pass_fds=tuple(pass_fds),
                    start_new_session=True)   # a terminal's Ctrl-C goes to pykvm, which stops it
            finally:
                os.close(log)
            self._log_fd = os.open(self.log_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._wait_for_socket()
        except OSError as error:
            self.stop()
            raise VhostUserError(f"{name}: cannot start its back end: "
                                 f"{error.strerror or error}") from None
        except BaseException:
            self.stop()
            raise

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None:
                raise VhostUserError(f"{self.name}: {self.describe_exit()}")
            if time.monotonic() > deadline:
                raise VhostUserError(f"{self.name}: no socket after {START_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def connected(self) -> None:
        """The front end is connected: the socket, the log's name and the directory
        are no longer needed (the log is read through the fd kept open)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self) -> str:
        """The last line the daemon wrote (its own words for why it stopped)."""
        if self._log_fd < 0:
            return ""
        try:
            size = os.fstat(self._log_fd).st_size
            start = max(0, size - LOG_TAIL)
            text = os.pread(self._log_fd, size - start, start)
        except OSError:
            return ""
        lines = text.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def describe_exit(self) -> str:
        status = self.process.poll() if self.process else None
        if status is None:
            return "still running"
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        tail = self.log_tail()
        return f"the back end {how}" + (f" ({tail})" if tail else "")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ended(self, timeout: float) -> bool:
        """Whether the daemon exits within ``timeout`` s (its socket closes a moment
        before the kernel makes it a zombie we can reap)."""
        process = self.process
        if process is None:
            return True
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.exit_status = process.returncode
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        shutil.rmtree(self.directory, ignore_errors=True)


def start_virtiofsd(source: str, *, read_only: bool = False, name: str = "virtiofsd") -> Daemon:
    """virtiofsd serving ``source`` on a socket in a private directory."""
    binary = virtiofsd_path()
    if binary is None:
        raise VhostUserError(f"{name}: {VIRTIOFSD} is not installed "
                             f"(apt-get install qemu-system-common)")
    source = str(Path(source).resolve())
    if not os.path.isdir(source):
        raise VhostUserError(f"{name}: {source} is not a directory")
    unshare = shutil.which("unshare") if read_only else None
    if read_only and unshare is None:
        raise VhostUserError(f"{name}: a read-only share needs unshare (util-linux)")

    def argv(directory: Path, socket_path: str) -> list[str]:
        served = str(directory / "ro") if read_only else source
        command = [binary, f"--socket-path={socket_path}", "-o", f"source={served}",
                   "-o", "cache=auto", "-o", "log_level=warn", "--rlimit-nofile=0"]
        if read_only:
            return [unshare, "--mount", "--", "/bin/sh", "-c", _READ_ONLY_WRAPPER, "sh",
                    source, served] + command
        return command
    return Daemon(name, argv)


def _dies_with_pykvm(argv: list[str]) -> list[str]:
    """``argv`` under ``setpriv --pdeathsig KILL`` when that is sound: the signal comes
    when the *thread* that started the daemon ends, so only from the main thread."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--"] + argv


def start_storage_daemon(image_fd: int, driver: str, *, read_only: bool = False,
                         name: str = "vhost-user-blk") -> Daemon:
    """qemu-storage-daemon exporting the image open at ``image_fd`` (``driver``: "raw" or
    "qcow2") as a vhost-user-blk device on a socket in a private directory.

    The daemon is handed pykvm's own fd (it opens ``/proc/self/fd/N``, the same file):
    the image it serves is the one pykvm opened, probed and locked, whatever happens to
    the path meanwhile. Read-only is enforced by the daemon, not only advertised: the
    block nodes are opened ``read-only=on`` and the export is ``writable=off``, so a
    write request fails in the daemon (VIRTIO_BLK_S_IOERR). Cache: the page cache, and a
    guest flush is an fsync -- as for pykvm's own virtio-blk."""
    binary = storage_daemon_path()
    if binary is None:
        raise VhostUserError(f"{name}: {STORAGE_DAEMON} is not installed "
                             f"(apt-get install qemu-system-common)")
    if driver not in ("raw", "qcow2"):
        raise VhostUserError(f"{name}: no image format {driver!r} (raw or qcow2)")
    # JSON, not QEMU's key=value syntax: no comma escaping, and "backing": null -- never
    # open a file the image names (pykvm refuses such images when it probes them,
    # pykvm/devices/virtio/vhost_blk.py; this holds even if the image changed since)
    file_node = {"driver": "file", "node-name": "file", "filename": f"/proc/self/fd/{image_fd}",
                 "read-only": read_only, "cache": {"direct": False, "no-flush": False}}
    disk_node = {"driver": driver, "node-name": "disk", "file": "file", "read-only": read_only}
    if driver == "qcow2":
        disk_node["backing"] = None

    def argv(directory: Path, socket_path: str) -> list[str]:
        export = {"type": "vhost-user-blk", "id": "disk0", "node-name": "disk",
                  "addr": {"type": "unix", "path": socket_path},
                  "writable": not read_only, "num-queues": 1}
        return _dies_with_pykvm([binary, "--blockdev", json.dumps(file_node),
                                 "--blockdev", json.dumps(disk_node),
                                 "--export", json.dumps(export)])
    return Daemon(name, argv, pass_fds=(image_fd,), exits_on_hangup=False)
