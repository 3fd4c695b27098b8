"""``pykvm run -- CMD`` through the guest agent, from the boot cache when it can.

A configuration that can be cached (:func:`refusal` says which cannot, and the run
says why in one line) runs its command like this:

1. its key (pykvm/warm/guest.py) names an entry of the boot cache (pykvm/warm/
   cache.py): the guest is restored from it and refreshed (entropy, clock). An
   entry that does not restore (damaged, another host kind, another pykvm) is
   removed and the run boots cold, saying so in one line;
2. otherwise the guest boots cold, and at its ready point (agent answering, no user
   command run, no disk mounted) it is snapshotted into the cache;
3. either way the command runs through the agent (``sh -c`` for one word, the exact
   argv joined as a shell line otherwise, as /init would run it), its stdout goes to
   pykvm's stdout as it arrives, its stderr to pykvm's stderr, and pykvm exits with
   its status (128+N for signal N, 127 not found). So the first run and the later
   ones print the same. ``--cold`` takes the same path with no cache at all: it
   neither reads nor writes one.

Configurations that cannot be cached keep the initramfs path (pykvm/machine/boot.py:
the command is appended to the initramfs and /init runs it on the console).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..errors import BootCacheError, PykvmError, RefreshFailed, first_line
from .guest import ConsoleLog, GuestSpec, boot_guest, fresh_exec, restore_guest

BOOT_TIMEOUT = 3600.0           # a distribution kernel on an emulated ring 0 takes minutes
BOOT_LOG_TAIL = 8192            # what a boot that never got ready shows of its console

# options that watch or steer the boot itself: a restored guest has no boot to show
WATCHING = (("stats", "--stats"), ("trace", "--trace"), ("trace_filter", "--trace-filter"),
            ("stats_interval", "--stats-interval"), ("stats_plot", "--stats-plot"),
            ("gdb", "--gdb"), ("api_sock", "--api-sock"))
# MachineConfig fields a GuestSpec does not carry because the run decides them itself
# (the kernel and initrd are in the spec, made absolute); any other field that differs
# from the spec's machine is a device or a setting the cache does not know
RUN_FIELDS = {"command", "stats", "verbose", "agent", "kvm_device", "kernel", "initrd"}


def refusal(args, config) -> str | None:
    """Why this ``pykvm run -- CMD`` cannot go through the agent and the boot cache
    (None: it can)."""
    from ..machine import default_guest_dir
    from ..machine.boot import GUEST_INITRAMFS, GUEST_KERNELS

    for name, option in WATCHING:
        if getattr(args, name, None):
            return f"{option} watches the boot itself"
    guest = default_guest_dir()
    if guest is None or not same_file(config.initrd, guest / GUEST_INITRAMFS):
        return "only the default guest's initramfs is known to start pykvm-agent"
    if not any(same_file(config.kernel, guest / name) for name in GUEST_KERNELS):
        # the agent's channel is a virtio console port: a distribution's kernel has
        # virtio as modules, which pykvm's initramfs does not load
        return "only the default guest's kernel is known to have the agent's virtio console"
    spec = spec_of(config)
    return spec.cache_refusal() or unknown_settings(config, spec)


def unknown_settings(config, spec: GuestSpec) -> str | None:
    """The settings of ``config`` that ``spec`` would not boot the same (a device or
    option newer than the cache's key): such a run is not cached rather than run in
    a guest without them."""
    import dataclasses

    rebuilt = spec.machine_config(config.kvm_device)
    differ = [f.name for f in dataclasses.fields(config) if f.name not in RUN_FIELDS
              and getattr(config, f.name) != getattr(rebuilt, f.name)]
    if differ:
        return f"the boot cache does not key over {', '.join(differ)}"
    return None


def same_file(given, path: Path) -> bool:
    return given is not None and path.exists() and Path(given).resolve() == path.resolve()


def spec_of(config) -> GuestSpec:
    return GuestSpec(kernel=str(Path(config.kernel).absolute()),
                     initrd=str(Path(config.initrd).absolute()), append=config.append,
                     mem=config.mem_size, cpus=config.cpus, console=config.console,
                     rng=config.rng, disks=tuple(config.disks), nets=tuple(config.nets),
                     shares=tuple(config.shares), clock_slowdown=config.clock_slowdown)


def run_command(args, config, stdout=None, stderr=None) -> int | None:
    """Run ``config.command`` as the module docstring says and return its status; None
    when this configuration takes the initramfs path instead (the reason printed,
    unless ``--cold``)."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    reason = refusal(args, config)
    if reason is not None:
        if not args.cold:
            say(stderr, f"not using the boot cache: {reason}")
        return None
    cache = None
    if not args.cold:
        from .cache import BootCache, configured_cap, default_root
        cache = BootCache(default_root(), configured_cap())
    signal.signal(signal.SIGTERM, _terminate)       # unwind: the guest is closed
    return WarmRun(spec_of(config), config.kvm_device, cache, args.verbose, stdout,
                   stderr).run(config.command)


class WarmRun:
    """One command in one guest, restored from ``cache`` or booted (and cached)."""

    def __init__(self, spec: GuestSpec, device: str, cache, verbose: bool, stdout, stderr):
        self.spec, self.device, self.cache = spec, device, cache
        self.verbose = verbose
        self.stdout, self.stderr = stdout, stderr
        self.progress = verbose or stderr.isatty()
        self.console = ConsoleLog(echo=stderr if verbose else None)
        self.key: str | None = None

    def run(self, command: str) -> int:
        if self.cache is not None:
            # once, before the boot: the key of the code and files this process runs
            self.key = self.spec.key(self.device, self.cache.digest_memo())
        result = self.warm(command)
        if result is None:
            guest = self.booted()
            try:
                result = guest.machine.exec(command, stdout_sink=self.stdout)
            finally:
                guest.close()
        self.stdout.flush()
        self.stderr.write(result.stderr)
        self.stderr.flush()
        return result.status if isinstance(result.status, int) else 1

    def warm(self, command: str):
        """The command's Result in the cached boot, restored and refreshed; None when
        there is none to use (an entry that failed is dropped, with one line)."""
        if self.cache is None:
            return None
        try:
            with self.cache.locked(exclusive=False):
                entry = self.cache.lookup(self.key)
                if entry is None:
                    return None
                guest = restore_guest(entry, self.device, self.console, answering=False)
        except (BootCacheError, OSError) as error:   # the cache itself: left alone
            say(self.stderr, f"not using the boot cache: {first_line(error)}")
            self.cache = None
            return None
        except PykvmError as error:                   # the entry: dropped
            return self.drop(entry, error)
        self.cache.touch(entry)
        if self.progress:
            say(self.stderr, f"restored the boot cached in {entry}")
        try:
            return fresh_exec(guest, command, stdout_sink=self.stdout)
        except RefreshFailed as error:
            return self.drop(entry, error)
        finally:
            guest.close()

    def drop(self, entry: Path, error: PykvmError) -> None:
        say(self.stderr, f"the cached boot {entry} cannot be used ({first_line(error)}): "
                         f"removed it, booting cold")
        self.cache.drop(entry)
        return None

    def booted(self):
        """A cold boot to the ready point, snapshotted into the cache (if any)."""
        if self.progress:
            from ..machine import format_size
            say(self.stderr, f"booting {self.spec.kernel} with {format_size(self.spec.mem)}, "
                             f"{self.spec.cpus} vCPU(s)" +
                             (" (cached for the next runs)" if self.cache else ""))
        try:
            guest = boot_guest(self.spec, self.device, self.console, BOOT_TIMEOUT)
        except PykvmError:
            if not self.verbose:        # the command never ran: the boot log says why
                self.stderr.write(self.console.getvalue()[-BOOT_LOG_TAIL:])
                self.stderr.flush()
            raise
        if self.cache is not None:
            try:
                self.cache.store(guest.machine, self.key, self.spec.describe(),
                                 self.console.getvalue())
            except (PykvmError, OSError) as error:
                say(self.stderr, f"could not cache this boot: {first_line(error)}")
        return guest


def say(stream, line: str) -> None:
    stream.write(f"pykvm: {line}\n".encode())
    stream.flush()


def _terminate(signum, frame):
    raise SystemExit(128 + signum)
