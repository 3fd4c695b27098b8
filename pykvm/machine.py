"""A PC-like machine: a VM with the legacy devices every guest expects, and a
way to boot it (a flat binary or a Linux kernel).

The CLI builds a :class:`MachineConfig` and hands it here; tests and the pytest
plugin use the same entry point.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import layout
from .errors import ConfigError, ImageError, PykvmError
from .images import read_image_file
from .kvm import DEFAULT_DEVICE, Kvm
from .memory import GuestMemory
from .vstate.control import Stop
from .vstate.vm import Vm

DEFAULT_MEM = 512 * layout.MiB
LINUX_CONSOLE_CMDLINE = "console=ttyS0 reboot=k panic=-1"


@dataclass
class MachineConfig:
    mem_size: int = DEFAULT_MEM
    cpus: int = 1
    flat: Path | None = None
    entry: str = "real"
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    command: str | None = None          # `pykvm run -- CMD`: a shell command line for the guest
    kvm_device: str = DEFAULT_DEVICE
    stats: bool = False
    verbose: bool = False               # stream the boot log in command mode
    extract_kernel: bool = True         # bzImage: load the extracted vmlinux (skip the decompressor)
    disks: list = field(default_factory=list)  # DiskSpec of each virtio-blk disk
    console: str = "serial"             # the guest console: "serial" (ttyS0) or "virtio" (hvc0)
    rng: bool = False                   # a virtio-rng device
    nets: list = field(default_factory=list)   # NetSpec of each virtio-net NIC (pykvm/net)
    agent: bool = False                 # the guest agent's channel (pykvm/agent.py): exec, files
    shares: list = field(default_factory=list)  # host dirs, read-only at /mnt/share... (pykvm/share.py)
    live_shares: list = field(default_factory=list)  # FsSpec: virtio-fs over vhost-user (devices/virtio/fs.py)
    rootfs: str = ""                    # --rootfs DIR: the guest's root over virtio-fs (pykvm/share.py)
    workdir: str = ""                   # with rootfs: shared read-write, the command runs there
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.mem_size <= 0 or self.mem_size % layout.PAGE_SIZE:
            raise ConfigError(f"memory size {self.mem_size} bytes is not a multiple of 4 KiB")
        minimum = layout.MIN_LINUX_MEM if self.kernel else layout.MIN_MEM_SIZE
        if self.mem_size < minimum:
            raise ConfigError(f"memory size {format_size(self.mem_size)} is too small "
                              f"(at least {format_size(minimum)} for this guest)")
        if self.mem_size > layout.MAX_MEM_SIZE:
            raise ConfigError(f"memory size {format_size(self.mem_size)} is too large")
        if not 1 <= self.cpus <= 255:
            raise ConfigError(f"--cpus {self.cpus}: must be between 1 and 255")
        if (self.flat is None) == (self.kernel is None):
            raise ConfigError("give exactly one of --flat FILE or --kernel FILE")
        if self.console not in ("serial", "virtio"):
            raise ConfigError(f"--console {self.console}: must be serial or virtio")
        if (self.agent or self.shares or self.live_shares or self.rootfs) and \
                self.flat is not None:
            raise ConfigError("--agent and --share need a Linux guest (the agent runs in it)")


def format_size(size: int) -> str:
    for unit, scale in (("GiB", layout.GiB), ("MiB", layout.MiB), ("KiB", layout.KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"k": layout.KiB, "m": layout.MiB, "g": layout.GiB, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'512M', '1G', '65536K', '2GiB', '4096B', or a bare number of MiB (QEMU's convention)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"cannot read the size {text!r} (use e.g. 512M or 2G)")
    number, prefix, suffix = match.groups()
    scale = _SIZE_UNITS[prefix.lower()] if prefix else (1 if suffix else layout.MiB)
    size = int(float(number) * scale)
    if size <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return size


class ConsoleRouter:
    """Where guest console output goes. In command mode the guest's boot log is
    held back (or streamed to stderr with --verbose) until /init says the
    command starts; from then on, output is the command's and goes to stdout."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, command_mode: bool, verbose: bool):
        self.stdout, self.stderr = stdout, stderr
        self.command_mode = command_mode
        self.verbose = verbose
        self.command_started = not command_mode
        self.boot_log = bytearray()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.command_started:
                self.stdout.write(data)
                self.stdout.flush()
                return
            self.boot_log += data
            del self.boot_log[:-1 << 20]  # keep the last MiB
            if self.verbose:
                self.stderr.write(data)
                self.stderr.flush()

    def flush(self) -> None:
        for stream in (self.stdout, self.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass

    def start_command(self) -> None:
        with self._lock:
            self.command_started = True


class Machine:
    """Build with a config, then :meth:`run`; always :meth:`close` (or use ``with``)."""

    def __init__(self, config: MachineConfig, *, stdout: BinaryIO | None = None,
                 stderr: BinaryIO | None = None, stdin: BinaryIO | None = None, tracer=None,
                 memory: GuestMemory | None = None):
        """With ``memory`` (a snapshot's RAM, which the machine then owns) no guest is
        loaded: the caller restores the saved state instead (pykvm/snapshot)."""
        config.validate()
        self.config = config
        self.stdout = stdout or sys.stdout.buffer
        self.stderr = stderr or sys.stderr.buffer
        self.stdin = stdin
        self.started = time.monotonic()
        self.progress: list[tuple[int, float]] = []
        self.kvm = self.memory = self.vm = None
        self.console = ConsoleRouter(self.stdout, self.stderr,
                                     command_mode=config.command is not None,
                                     verbose=config.verbose)
        self._host_console = None
        self.virtio = None
        self.agent = None                   # AgentClient with config.agent (pykvm/agent.py)
        try:
            self.kvm = Kvm(config.kvm_device)
            self.memory = memory if memory is not None else GuestMemory.anonymous(config.mem_size)
            self.vm = Vm(self.kvm, self.memory, tracer=tracer,
                         timing=config.stats or tracer is not None)
            self._add_legacy_devices()
            self._add_virtio_devices()
            self.vm.create_vcpus(config.cpus)
            self.boot_info = self._load_guest() if memory is None else None
        except BaseException:
            self.close()
            raise

    # --- devices -------------------------------------------------------------------------
    def _add_legacy_devices(self) -> None:
        from .devices import i8042
        from .devices.guest_control import GuestControl
        from .devices.rtc import Rtc
        from .devices.serial import Serial

        vm = self.vm
        self.serial = Serial(vm.irq_line(4), self.console)
        vm.add_pio_device(0x3F8, 8, self.serial)
        vm.add_pio_device(i8042.PORT_BASE, i8042.PORT_COUNT, i8042.I8042(
            on_reset=self._guest_reset, kbd_irq=vm.irq_line(1), aux_irq=vm.irq_line(12)))
        vm.add_pio_device(0x70, 2, Rtc())
        self.guest_control = GuestControl(on_exit=self._guest_exit, on_progress=self._progress)
        vm.add_pio_device(layout.EXIT_PORT, 2, self.guest_control)
        from .devices.acpi_pm import AcpiPm
        self.acpi_pm = AcpiPm(on_poweroff=self._guest_poweroff)
        vm.add_pio_device(layout.ACPI_PM_BASE, layout.ACPI_PM_LEN, self.acpi_pm)

    def _add_virtio_devices(self) -> None:
        config = self.config
        if config.disks or config.console == "virtio" or config.rng or config.nets or \
                config.agent or config.shares or config.live_shares or config.rootfs:
            from .devices.virtio import attach_virtio
            from .net.plumbing import machine_key
            extra = self._agent_devices()
            self.virtio = attach_virtio(self.vm, self.memory,
                                        disks=config.disks + self._share_disks(),
                                        console=config.console == "virtio", rng=config.rng,
                                        console_output=self.console, nets=config.nets,
                                        net_key=machine_key(config), extra=extra,
                                        shares=config.live_shares + self._rootfs_shares())

    def _rootfs_shares(self) -> list:
        from .share import rootfs_shares
        return rootfs_shares(self.config)

    def _agent_devices(self) -> list:
        """The agent's virtio-serial device (``--agent``; ``--share`` implies it)."""
        if not (self.config.agent or self.config.shares):
            return []
        from .agent import agent_channel
        device, self.agent = agent_channel(alive=lambda: not self.vm.stop_requested)
        self.vm.on_close(lambda: self.agent.close("the VM was closed"))
        return [device]

    def _share_disks(self) -> list:
        """A read-only ext2 image per ``--share`` directory, removed when the VM closes."""
        if not self.config.shares:
            return []
        import shutil
        import tempfile
        from .share import share_disks
        workdir = tempfile.mkdtemp(prefix="pykvm-share-")
        self.vm.on_close(lambda: shutil.rmtree(workdir, ignore_errors=True))
        return share_disks(self.config.shares, workdir)

    def _guest_exit(self, status: int) -> None:
        self.vm.request_stop("exit", status, f"guest exited with status {status}")

    def _guest_reset(self) -> None:
        self.vm.request_stop("reset", 0, "guest requested a reset")

    def _guest_poweroff(self) -> None:
        self.vm.request_stop("poweroff", 0, "guest powered off (ACPI S5)")

    def _progress(self, code: int) -> None:
        self.progress.append((code, time.monotonic() - self.started))
        if code == layout.PROGRESS_COMMAND_STARTED:
            self.serial.flush()
            self.console.start_command()

    # --- boot --------------------------------------------------------------------------------
    def _load_guest(self):
        config = self.config
        vcpu = self.vm.vcpus[0]
        from .boot.modes import set_mode

        if config.flat is not None:
            image = read_image_file(config.flat, "flat binary")
            load = layout.FLAT_LOAD_ADDR
            room = self.memory.size - load if self.memory.size <= layout.PCI_HOLE_START \
                else layout.PCI_HOLE_START - load
            if len(image) > room:
                raise ImageError(f"{config.flat}: flat binary of {len(image)} bytes does not fit "
                                 f"in guest RAM above {load:#x} ({format_size(config.mem_size)})")
            self.memory.write(load, image)
            set_mode(vcpu, self.memory, config.entry, load)
            return None
        from .boot.linux import load_linux

        initrd = read_image_file(config.initrd, "initrd") if config.initrd else b""
        if config.command is not None:
            from .boot.cpio import command_archive
            initrd = pad4(initrd) + command_archive(config.command)
        boot = load_linux(self.memory, str(config.kernel), initrd or None, self.linux_cmdline(),
                          extract=config.extract_kernel)
        del initrd
        release_freed_heap()
        self._write_firmware_tables(boot)
        set_mode(vcpu, self.memory, "long", boot.entry, rsi=boot.boot_params_addr)
        return boot

    def _write_firmware_tables(self, boot) -> None:
        """How Linux finds its CPUs, IOAPIC and power-off: the ACPI tables (RSDP in the
        zero page and at 0xE0000), and the MP table for a kernel booted with acpi=off."""
        from .boot.acpi import write_acpi_tables
        from .boot.mptable import write_mptable
        from .boot.zeropage import set_acpi_rsdp

        write_mptable(self.memory, self.config.cpus)
        self.acpi_tables = write_acpi_tables(self.memory, self.config.cpus)
        set_acpi_rsdp(self.memory, boot.boot_params_addr, self.acpi_tables.rsdp)

    def linux_cmdline(self) -> str:
        parts = [LINUX_CONSOLE_CMDLINE]
        if self.config.console == "virtio":
            parts = [LINUX_CONSOLE_CMDLINE.replace("console=ttyS0", "console=hvc0")]
        if self.virtio is None:
            parts.append("pci=off")   # no PCI devices: spare the guest the bus scan
        else:
            # The DSDT declares no PCI root bridge (it is kept minimal), and with ACPI
            # Linux scans only the roots ACPI declares: have it probe bus 0 through conf1.
            parts.append("pci=noacpi")
        if self.config.command is not None and not self.config.verbose:
            parts.append("quiet")
        if self.config.agent or self.config.shares:
            from .agent import CMDLINE_FLAG
            parts.append(CMDLINE_FLAG)      # the default guest's /init starts pykvm-agent
        if self.config.live_shares:
            from .share import virtiofs_cmdline
            parts.append(virtiofs_cmdline(self.config))   # the default guest's /init mounts them
        dhcp = [nic.mac.hex(":") for nic in (self.virtio.nets if self.virtio else []) if nic.dhcp]
        if dhcp:
            parts.append("pykvm.dhcp=" + ",".join(dhcp))  # /init runs udhcpc on these NICs
        if self.config.rootfs:
            from .share import rootfs_cmdline
            parts.append(rootfs_cmdline(self.config))     # /init switches to that root
        # Tell the kernel its TSC frequency instead of letting it calibrate against the
        # PIT: calibration is slow everywhere and fails outright when guest ring 0 is
        # emulated (kvm_pvm), leaving a guest clock that runs at a third of real time.
        parts.append(f"tsc_early_khz={self.vm.vcpus[0].tsc_khz()}")
        parts.append(self.config.append)
        return self.vm.quirks.adjust_cmdline(" ".join(p for p in parts if p))

    # --- running -----------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> Stop | None:
        interactive = self.stdin is not None
        if interactive:
            from .console import HostConsole
            receive = self.virtio.console.receive if self.config.console == "virtio" \
                else self.serial.receive
            self._host_console = HostConsole(self.stdin, receive,
                                             on_quit=self._user_quit)
            self._host_console.start()
        try:
            stop = self.vm.run(timeout)
        finally:
            if self._host_console is not None:
                self._host_console.stop()
            self.serial.flush()
            self.console.flush()
        if stop is not None and self.config.command is not None and \
                not self.console.command_started and not self.config.verbose:
            # The command never ran: the boot log is what explains why.
            self.stderr.write(bytes(self.console.boot_log[-8192:]))
            self.stderr.flush()
        return stop

    # --- the guest agent (pykvm/agent.py) -----------------------------------------------------
    def _agent_client(self):
        if self.agent is None:
            from .agent import AgentUnavailable
            raise AgentUnavailable("this machine has no agent channel (pykvm run --agent, or "
                                   "MachineConfig(agent=True))")
        return self.agent

    def wait_for_agent(self, timeout: float = 900.0) -> None:
        """Until the guest agent answers (a booting guest starts it after its kernel)."""
        self._agent_client().wait_ready(timeout)

    def exec(self, command, timeout: float | None = None, **options):
        """Run ``command`` in the running guest (a string: a shell command line; a list:
        argv); returns ``Result(status, stdout, stderr)``. Past ``timeout`` seconds the
        command is killed in the guest and ``AgentTimeout`` raised. Options: stdin
        (bytes), env (dict), cwd, check, ready_timeout (see AgentClient.exec)."""
        return self._agent_client().exec(command, timeout=timeout, **options)

    def put_file(self, guest_path: str, data: bytes, mode: int = 0o644, **options) -> None:
        """Write ``data`` to the guest file ``guest_path``."""
        self._agent_client().put_file(guest_path, data, mode, **options)

    def get_file(self, guest_path: str, **options) -> bytes:
        """The content of the guest file ``guest_path``."""
        return self._agent_client().get_file(guest_path, **options)[0]

    def copy_in(self, host_path, guest_path: str, **options) -> None:
        """Copy a host file or directory into the guest."""
        self._agent_client().copy_in(host_path, guest_path, **options)

    def copy_out(self, guest_path: str, host_path, **options) -> None:
        """Copy a guest file or directory to the host."""
        self._agent_client().copy_out(guest_path, host_path, **options)

    def _user_quit(self) -> None:
        self.vm.request_stop("user", 0, "quit from the console (Ctrl-A x)")

    def request_stop(self, kind: str, status: int, message: str) -> None:
        self.vm.request_stop(kind, status, message)

    def close(self) -> None:
        if self._host_console is not None:
            self._host_console.stop()
        for resource in (self.vm, self.memory, self.kvm):
            if resource is not None:
                resource.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pad4(data: bytes) -> bytes:
    """Concatenated initramfs archives must start 4-byte aligned."""
    return data + b"\0" * (-len(data) % 4)


def default_guest_dir() -> Path | None:
    """Where the default Linux guest is: $PYKVM_GUEST_DIR, else the cache's build of this
    pykvm's guest sources (`pykvm guest build`; pykvm/guestimage/cache.py); None if neither."""
    from .guestimage.cache import find_guest

    if os.environ.get("PYKVM_GUEST_DIR"):
        directory = Path(os.environ["PYKVM_GUEST_DIR"])
        if (directory / "vmlinux").exists() or (directory / "bzImage").exists():
            return directory
    return find_guest()


def release_freed_heap() -> None:
    """Give the host back what loading the kernel freed. The kernel image, its extracted
    vmlinux and the initrd pass through Python bytes (tens of MiB at the peak); glibc keeps
    freed memory in its heap, which left ~8 MiB resident for the VM's whole life
    (bench/memory.py). malloc_trim(0) is glibc's; elsewhere there is nothing to call."""
    import ctypes
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def default_linux_guest() -> tuple[Path, Path | None]:
    directory = default_guest_dir()
    if directory is None:
        raise ConfigError("no --kernel given and the default guest is not built: run `pykvm guest build` "
                          "(or pass --kernel PATH)")
    kernel = directory / "vmlinux" if (directory / "vmlinux").exists() else directory / "bzImage"
    initrd = directory / "initramfs.cpio"
    return kernel, initrd if initrd.exists() else None


__all__ = ["Machine", "MachineConfig", "parse_size", "format_size", "default_linux_guest",
           "PykvmError"]
