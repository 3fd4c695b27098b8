"""User-mode networking: a NIC whose host end is passt, with no privileges.

    --net user[,mac=MAC][,fwd=tcp:HOSTPORT:GUESTPORT]...[,fwd=udp:HOSTPORT:GUESTPORT]...
    --net passt=SOCKET[,mac=MAC]

passt (https://passt.top, Debian package ``passt``) is the user-mode network
stack QEMU and podman use: it answers the guest's DHCP, NDP and DHCPv6, gives it
the host's own address and default gateway, and carries each of its TCP and UDP
flows on an ordinary host socket -- no TAP, no NAT tables, no CAP_NET_ADMIN.
The guest reaches the host's loopback services through the gateway's address
(passt maps it to the host unless started with ``--no-map-gw``; pykvm passes
that for ``map-gw=off``). ``-t``/``-u HOST:GUEST`` forward host ports in.

``--net user``: :class:`Passt` starts one passt per NIC on one end of a
socketpair (``--fd``; so no socket file exists at all, and the question of who
may open it does not arise), ``--one-off`` so that passt ends when that socket
closes, ``--foreground`` so that it stays our child. It writes its PID file
(in a private mkdtemp directory, 0700) once it has read its configuration and
bound the forwarded ports: that is the readiness signal; a passt that exits
first is a ConfigError with its own last message. Started as root, passt
refuses to stay root and runs as ``nobody`` (``--runas``); the directory is
then handed to that user so that passt can write its PID file.

Every exit path: :meth:`Passt.close` (the NIC's close, which the VM's close and
a failed set-up call) closes pykvm's end and stops passt (SIGTERM, then SIGKILL
after STOP_TIMEOUT), then removes the directory; if pykvm itself is killed, the
socket's other end closes with it and ``--one-off`` ends passt.

``--net passt=SOCKET``: connect to a passt the user started (``passt -s
SOCKET``); pykvm only closes its connection.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from ..errors import ConfigError
from .stream import StreamWire

PASST = "passt"
READY_TIMEOUT = 20.0         # seconds for passt to read its options and bind its ports
STOP_TIMEOUT = 5.0
LOG_LIMIT = 64 * 1024        # bytes of passt's stderr kept for messages
PID_FILE = "passt.pid"
DEFAULT_MTU = 1500           # what passt announces over DHCP (its own default is 65520)
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class Forward:
    """One ``fwd=PROTO:HOSTPORT:GUESTPORT``: a host port passt listens on, into the guest."""

    protocol: str            # "tcp" or "udp"
    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, text: str) -> "Forward":
        parts = text.split(":")
        if len(parts) != 3 or parts[0] not in ("tcp", "udp"):
            raise ConfigError(f"fwd={text!r}: use fwd=tcp:HOSTPORT:GUESTPORT or "
                              f"fwd=udp:HOSTPORT:GUESTPORT")
        ports = []
        for part in parts[1:]:
            if not part.isdigit() or not 1 <= int(part) <= 65535:
                raise ConfigError(f"fwd={text!r}: {part!r} is not a port (1 to 65535)")
            ports.append(int(part))
        return cls(parts[0], ports[0], ports[1])

    def option(self) -> list[str]:
        return ["--tcp-ports" if self.protocol == "tcp" else "--udp-ports",
                f"{self.host_port}:{self.guest_port}"]

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host_port}:{self.guest_port}"


def passt_binary() -> str | None:
    return shutil.which(PASST)


def unprivileged_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


class Passt:
    """One passt process pykvm started, and pykvm's end of its socket (``fd``)."""

    def __init__(self, forwards: tuple[Forward, ...] = (), *, map_gw: bool = True,
                 mtu: int = DEFAULT_MTU, binary: str | None = None,
                 ready_timeout: float = READY_TIMEOUT):
        binary = binary or passt_binary()
        if binary is None:
            raise ConfigError("--net user needs passt (Debian/Ubuntu: apt-get install passt)")
        self.forwards = tuple(forwards)
        self.process: subprocess.Popen | None = None
        self.fd = -1
        self._lock = threading.Lock()
        self._log = os.memfd_create("pykvm-passt-log", os.MFD_CLOEXEC)
        self.directory = tempfile.mkdtemp(prefix="pykvm-passt-")     # 0700, ours
        try:
            self._start(binary, map_gw, mtu, ready_timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, binary: str, map_gw: bool, mtu: int, ready_timeout: float) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid_file = os.path.join(self.directory, PID_FILE)
        argv = [binary, "--foreground", "--quiet", "--one-off", "--fd", str(theirs.fileno()),
                "--pid", pid_file, "--mtu", str(mtu)]
        if os.geteuid() == 0:
            uid, gid = unprivileged_ids()
            os.chown(self.directory, uid, gid)     # passt writes its PID file as that user
            argv += ["--runas", f"{uid}:{gid}"]
        if not map_gw:
            argv.append("--no-map-gw")
        for forward in self.forwards:
            argv += forward.option()
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                pass_fds=(theirs.fileno(),), start_new_session=True)
        except OSError as error:
            ours.close()
            raise ConfigError(f"cannot start {binary}: {error.strerror}") from None
        finally:
            theirs.close()
        self.fd = ours.detach()
        deadline = time.monotonic() + ready_timeout
        while not _pid_written(pid_file):
            if self.process.poll() is not None:
                raise ConfigError(f"passt failed to start (exit status {self.process.returncode})"
                                  f": {self.last_message() or 'no message'}")
            if time.monotonic() > deadline:
                raise ConfigError(f"passt did not get ready in {ready_timeout:.0f} s: "
                                  f"{self.last_message() or 'no message'}")
            time.sleep(0.01)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def last_message(self) -> str:
        """passt's last line on stderr, less its syslog complaints (no syslog here)."""
        try:
            size = os.fstat(self._log).st_size
            data = os.pread(self._log, LOG_LIMIT, max(0, size - LOG_LIMIT))
        except OSError:
            return ""
        lines = [line for line in data.decode(errors="replace").splitlines()
                 if line.strip() and not line.startswith("Failed to send")]
        return lines[-1].strip() if lines else ""

    def take_fd(self) -> int:
        """pykvm's end of the socket, for the NIC's wire (which then closes it)."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        """Stop passt and remove what it left; safe to call twice, from any thread."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            process, self.process = self.process, None
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None
            if self._log >= 0:
                os.close(self._log)
                self._log = -1


def _pid_written(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read().endswith(b"\n")
    except OSError:
        return False


def connect_socket(path: str) -> int:
    """A connection to a passt the user started with ``-s PATH`` (an fd, owned)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        raise ConfigError(f"--net passt={path}: cannot connect: "
                          f"{error.strerror or error}") from None
    return sock.detach()


class UserNic:
    """One --net user / passt= NIC's host end: its StreamWire and, for ``user``, the
    passt process (closed with it)."""

    dhcp = True        # the default guest's /init runs udhcpc on it

    def __init__(self, spec, mac: bytes):
        self.spec = spec
        self.mac = mac
        self.mtu = DEFAULT_MTU
        self.passt: Passt | None = None
        if spec.passt_socket is not None:
            fd = connect_socket(spec.passt_socket)
        else:
            self.passt = Passt(spec.forwards, map_gw=spec.map_gw, mtu=self.mtu)
            fd = self.passt.take_fd()
        self.wire = StreamWire(fd, self.mtu)

    def describe(self) -> str:
        from .mac import format_mac
        if self.passt is None:
            where = f"passt at {self.spec.passt_socket}"
        else:
            where = f"user networking (passt pid {self.passt.pid})"
            if self.spec.forwards:
                where += ", forwarding " + " ".join(map(str, self.spec.forwards))
        return f"{where}, MAC {format_mac(self.mac)}"

    def close(self) -> None:
        self.wire.close()
        if self.passt is not None:
            self.passt.close()


def open_user_nic(spec, mac: bytes) -> UserNic:
    return UserNic(spec, mac)


def user_networking_status() -> str | None:
    """None when ``--net user`` can work here, else why not (for `pykvm check`)."""
    binary = passt_binary()
    if binary is None:
        return "passt is not installed (apt-get install passt)"
    return None
