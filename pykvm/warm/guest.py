"""A Linux guest at its *ready* point, booted or restored, and what identifies it.

The ready point is the moment the guest agent (pykvm/agent/, pykvm/guestimage/
agent.c) first answers a PING: the kernel is up, /init has mounted its own file
systems and started the agent, and no user command has run yet. The agent mounts
``--share`` disks before it answers, which is why a guest with shares is keyed over
the shared trees' content. A guest with a ``--net`` NIC is never kept (a restore would
meet a TAP that no longer exists); ``pykvm run`` keeps none with a ``--disk`` either,
while the pytest plugin keys a guest's disk images over their content and restores
the snapshot onto the test's own image (:attr:`GuestSpec.restorable`).

A snapshot taken there (pykvm/snapshot) can be restored any number of times, each
copy continuing from the same kernel state. What would make the copies tell apart
from a fresh boot is fixed by :func:`fresh_exec` on every restore:

* entropy: the agent's REFRESH request (:func:`fresh_exec`, done inside pykvm-agent:
  no process is started for it) feeds 512 bytes of the host's ``os.urandom``
  into the guest's input pool, credits them (RNDADDENTROPY) and forces the CRNG to
  reseed (RNDRESEEDCRNG, random(4)); without the reseed two copies would read the
  same ``/dev/urandom`` bytes (Linux >= 5.18 reseeds an initialised CRNG only on a
  timer);
* the wall clock: the same call sets CLOCK_REALTIME to the host's time.

What stays shared by every copy of one snapshot (docs in README's "Boot cache"): the
kernel's address-space layout (KASLR) and anything else the kernel chose at boot
(stack canaries, hash seeds), the PIDs and the boot's uptime. The default guest has
no hostname or boot id of its own (no /proc/sys), so there is none to renew. Whoever
needs a guest that shares nothing with another boots it cold.

Both ``pykvm run -- CMD`` (pykvm/warm/run.py) and the pytest plugin's ``linux_vm``
use this module: one key, one boot, one readiness, one restore.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .digests import DigestMemo

CONSOLE_KEEP = 1 << 20
RESTORE_READY_TIMEOUT = 60.0        # a restored agent answers at once; this is a bound
REFRESH_SEED_BYTES = 512            # agent.c's REFRESH_BYTES
REFRESH_FAILED = 125                # agent.c's: the refresh failed, the command did not run
REFRESH_ERROR = b"pykvm-agent: refresh:"
AGENT_BINARY = "/sbin/pykvm-agent"

# pykvm modules that never shape a guest's state: a change to them keeps the snapshots
# (nor does guestimage/, the default guest's builder: the kernel and initramfs it makes
# are in the key themselves; nor do the front ends: cli/, the control socket (control/)
# and the pytest plugin)
STATELESS_PACKAGES = {"guestimage", "cli", "control", "pytest_plugin"}
STATELESS_SOURCES = {"__main__.py",
                     "observe/plot.py", "observe/stats.py", "observe/kvmstats.py", "gdb/__init__.py",
                     "gdb/protocol.py", "gdb/registers.py", "gdb/listen.py", "gdb/breakpoints.py",
                     "gdb/traps.py", "gdb/stub.py",
                     "warm/cli.py", "warm/cache.py", "warm/run.py", "warm/__init__.py",
                     "warm/digests.py"}


class ConsoleLog:
    """A file-like sink for a machine's console output that keeps the last MiB, and
    passes it on to ``echo`` too when one is given (``pykvm run -v``)."""

    def __init__(self, echo=None):
        self._data = bytearray()
        self._lock = threading.Lock()
        self._echo = echo

    def write(self, data) -> int:
        with self._lock:
            self._data += data
            del self._data[:-CONSOLE_KEEP]
        if self._echo is not None:
            self._echo.write(data)
            self._echo.flush()
        return len(data)

    def flush(self) -> None:
        pass

    def getvalue(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def text(self, tail: int = 16 * 1024) -> str:
        return self.getvalue()[-tail:].decode(errors="replace")


# --- the configuration and its key -------------------------------------------------------------
@dataclass(frozen=True)
class GuestSpec:
    """What a Linux guest is booted from: everything that decides the state it reaches
    at its ready point (the key hashes all of it, file contents included)."""

    kernel: str
    initrd: str | None
    append: str
    mem: int
    cpus: int
    console: str = "serial"
    rng: bool = False
    disks: tuple = ()               # DiskSpec
    nets: tuple = ()                # NetSpec
    shares: tuple = ()              # host directories, read-only in the guest
    clock_slowdown: int = 0         # MachineConfig.clock_slowdown (0: the host's default)

    @property
    def restorable(self) -> bool:
        """Whether a snapshot at the ready point can stand in for a boot: not with a NIC
        (its TAP or passt is the host's live resource), nor with a disk served by another
        process (vhost-user); image files are keyed over their content (:meth:`key`), so
        a snapshot restored onto another image with the same bytes is the boot it
        stands for (a guest at its ready point has read its disks, never written them)."""
        return not self.nets and not any(disk.socket or disk.backend == "vhost-user"
                                         or disk.format == "qcow2" for disk in self.disks)

    def cache_refusal(self) -> str | None:
        """Why ``pykvm run`` does not keep this boot (None: it does)."""
        if self.disks:
            return "a --disk is attached (the cached boot must not have seen a disk that may change)"
        if self.nets:
            return "a --net NIC is attached (its TAP belongs to one run)"
        if self.shares:
            return "a --share is attached (its image is made anew by every run)"
        return None

    def machine_config(self, device: str):
        from ..machine import MachineConfig

        return MachineConfig(mem_size=self.mem, cpus=self.cpus, kernel=Path(self.kernel),
                             initrd=Path(self.initrd) if self.initrd else None,
                             append=self.append, kvm_device=device, disks=list(self.disks),
                             console=self.console, rng=self.rng, nets=list(self.nets),
                             agent=True, shares=list(self.shares),
                             clock_slowdown=self.clock_slowdown)

    def key(self, device: str, memo: DigestMemo | None = None) -> str:
        """The cache key: the kernel's and initramfs' bytes, the machine, the device,
        the host's kind of KVM, the snapshot format, the source of the pykvm modules
        that shape a guest's state (which says more than pykvm's version, read from the
        package's metadata for ~15-90 ms: not a part), and the shared trees. The files'
        digests come from ``memo`` when it remembers them unchanged (digests.py)."""
        from ..kvm import detect_host_kind
        from ..snapshot import VERSION

        memo = memo or DigestMemo(None)
        digest = hashlib.sha256()
        for path in (self.kernel, self.initrd):
            digest.update((memo.file_digest(path) if path is not None else "-").encode() + b"\0")
        digest.update(repr((self.append, self.mem, self.cpus, self.console, self.rng, device,
                            detect_host_kind(), VERSION, source_digest(memo),
                            self.shares, self.clock_slowdown)).encode())
        for disk in self.disks:         # the bytes and the options, not where the image is
            digest.update(memo.file_digest(disk.path).encode() + b"\0"
                          + repr(replace(disk, path="")).encode())
        for share in self.shares:
            tree_digest(share, digest)
        memo.save()
        return digest.hexdigest()[:24]

    def describe(self) -> dict:
        """The configuration as `pykvm cache list` shows it."""
        return {"kernel": self.kernel, "initrd": self.initrd, "append": self.append,
                "mem": self.mem, "cpus": self.cpus, "console": self.console, "rng": self.rng}


_SOURCE_DIGEST: str | None = None


def source_digest(memo: DigestMemo | None = None) -> str:
    """pykvm's own code, as far as it decides what a snapshot holds (once a process;
    from ``memo`` when no file of it changed since it was remembered)."""
    global _SOURCE_DIGEST
    if _SOURCE_DIGEST is None:
        import pykvm

        root = Path(pykvm.__file__).resolve().parent
        files = [(path.relative_to(root).as_posix(), path) for path in sorted(root.rglob("*.py"))
                 if path.relative_to(root).as_posix() not in STATELESS_SOURCES
                 and path.relative_to(root).parts[0] not in STATELESS_PACKAGES]
        _SOURCE_DIGEST = (memo or DigestMemo(None)).tree_digest(f"pykvm source:{root}", files,
                                                                hash_sources)
    return _SOURCE_DIGEST


def hash_sources(files: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for relative, path in files:
        digest.update(relative.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def tree_digest(directory: str, digest) -> None:
    """A share's content as the image will hold it: names, modes, sizes, times."""
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files + dirs):
            st = os.lstat(os.path.join(root, name))
            digest.update(f"{os.path.relpath(os.path.join(root, name), directory)}:{st.st_mode}:"
                          f"{st.st_size}:{st.st_mtime_ns}\0".encode())


# --- a running guest -------------------------------------------------------------------------------
class RunningGuest:
    """A machine running on a thread of its own, its agent answering."""

    def __init__(self, machine, console: ConsoleLog):
        self.machine = machine
        self.console = console
        self.stop = None
        self._thread = threading.Thread(target=self._run, name="linux-vm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.stop = self.machine.run()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        if self._thread.is_alive():
            self.machine.request_stop("user", 0, "done with the guest")
            self._thread.join(timeout=60)
        self.machine.close()


def boot_guest(spec: GuestSpec, device: str, console: ConsoleLog, timeout: float,
               factory=RunningGuest) -> RunningGuest:
    """Boot ``spec`` and wait (up to ``timeout`` s) for its ready point. The guest is
    closed again if it does not get there; the error is the agent's (AgentError)."""
    from ..machine import build_for_boot

    machine = build_for_boot(spec.machine_config(device), stdout=console, stderr=console)
    return running(factory(machine, console), timeout)


def restore_guest(directory: Path, device: str, console: ConsoleLog,
                  factory=RunningGuest, answering: bool = True,
                  disks=None) -> RunningGuest:
    """The guest saved in ``directory`` (a snapshot at a ready point that this pykvm
    took itself: its shares are trusted), running, its agent answering (a PING; with
    ``answering=False`` not waited for: :func:`fresh_exec`'s REFRESH is the first
    request and waits instead, a round trip and three guest system calls fewer).
    ``disks`` (DiskSpec, one per disk of the snapshot): the images to restore onto,
    instead of those the snapshot was taken with. SnapshotError, AgentError or
    KvmError when it cannot be."""
    from ..snapshot import restore_machine

    machine = restore_machine(directory, stdout=console, stderr=console, trust=True,
                              kvm_device=device, disks=list(disks) if disks else None)
    if not answering:
        return factory(machine, console)
    return running(factory(machine, console), RESTORE_READY_TIMEOUT)


def running(guest: RunningGuest, timeout: float) -> RunningGuest:
    """``guest`` once its agent answers (its ready point); closed if it does not
    within ``timeout`` seconds."""
    try:
        guest.machine.wait_for_agent(timeout)
    except BaseException:
        guest.close()
        raise
    return guest


def fresh_exec(guest: RunningGuest, command: str, **options):
    """Run the shell command line ``command`` in a restored guest made fresh first (the
    module docstring says what that covers): a REFRESH request with the host's
    randomness and time, done by the agent itself, then the command as any EXEC'd
    shell command line, which the agent hands to the shell it started before the ready
    point (agent.c's zygote: the cached boot holds it, so no process is created in
    the guest for a builtin, one fork for a program). An agent older than REFRESH
    gets ``pykvm-agent --refresh SECONDS NANOSECONDS COMMAND`` instead, which
    refreshes and then becomes ``sh -c COMMAND``. Returns the command's Result
    (pykvm.agent.AgentClient.exec; ``options`` go there); RefreshFailed when the
    guest could not be refreshed (the command did not run), or did not answer within
    RESTORE_READY_TIMEOUT seconds."""
    from ..agent import AgentTimeout, AgentUnavailable, RequestRefused
    from ..errors import RefreshFailed

    seed = os.urandom(REFRESH_SEED_BYTES)
    try:
        guest.machine.agent.refresh(seed, time.time_ns(), timeout=RESTORE_READY_TIMEOUT)
    except RequestRefused as error:
        if error.errno != errno.ENOSYS:
            raise RefreshFailed(f"pykvm-agent: {error}") from None
        return legacy_fresh_exec(guest, command, seed, **options)
    except (AgentTimeout, AgentUnavailable) as error:
        raise RefreshFailed(str(error)) from None
    return guest.machine.exec(command, **options)


def legacy_fresh_exec(guest: RunningGuest, command: str, seed: bytes, **options):
    """:func:`fresh_exec` with an agent that has no REFRESH request (built before it)."""
    from ..errors import RefreshFailed

    now = time.time_ns()
    result = guest.machine.exec(
        [AGENT_BINARY, "--refresh", str(now // 10**9), str(now % 10**9), command],
        stdin=seed, **options)
    if result.status == REFRESH_FAILED and result.stderr.startswith(REFRESH_ERROR):
        raise RefreshFailed(result.stderr.decode(errors="replace").strip().splitlines()[0])
    return result
