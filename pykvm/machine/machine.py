"""A PC-like machine, assembled: a VM with the legacy devices every guest expects, the
virtio devices its config asks for, and its vCPUs, with no guest in it yet.

:mod:`pykvm.machine.builder` builds one: :func:`~pykvm.machine.builder.build_for_boot`
then loads a guest (pykvm/machine/boot.py), :func:`~pykvm.machine.builder.build_from_snapshot`
maps a snapshot's RAM and applies its state (pykvm/snapshot). Port bases and IRQs of the
legacy devices are pykvm/layout.py's.
"""

from __future__ import annotations

import sys
import time
from typing import BinaryIO

from .. import layout
from ..kvm import Kvm
from ..memory import GuestMemory
from ..vstate.control import Stop
from ..vstate.vm import Vm
from .config import MachineConfig
from .router import ConsoleRouter


class Machine:
    """Built by pykvm/machine/builder.py; then :meth:`run`; always :meth:`close` (or use
    ``with``)."""

    def __init__(self, config: MachineConfig, *, memory: GuestMemory,
                 stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
                 stdin: BinaryIO | None = None, tracer=None):
        """Assemble the machine for ``config`` (validated) on ``memory``, which the machine
        owns from here on (closed with it, also when assembling fails). No guest is loaded
        and no state applied: that is the builder's next step."""
        self.config = config
        self.stdout = stdout or sys.stdout.buffer
        self.stderr = stderr or sys.stderr.buffer
        self.stdin = stdin
        self.started = time.monotonic()
        self.progress: list[tuple[int, float]] = []
        self.kvm = self.vm = None
        self.memory = memory
        self.boot_info = self.acpi_tables = None
        self.console = ConsoleRouter(self.stdout, self.stderr,
                                     command_mode=config.command is not None,
                                     verbose=config.verbose)
        self._host_console = None
        self.virtio = None
        self.agent = None                   # AgentClient with config.agent (pykvm/agent.py)
        self.vsock = None                   # VsockDevice with config.vsock_cid (pykvm/vsock)
        self.balloon = None                 # BalloonDevice with config.balloon
        try:
            self.kvm = Kvm(config.kvm_device)
            self.vm = Vm(self.kvm, self.memory, tracer=tracer,
                         timing=config.stats or tracer is not None)
            self._add_legacy_devices()
            self._add_virtio_devices()
            self.vm.create_vcpus(config.cpus)
        except BaseException:
            self.close()
            raise

    # --- devices -------------------------------------------------------------------------
    def _add_legacy_devices(self) -> None:
        from ..devices import i8042
        from ..devices.acpi_pm import AcpiPm
        from ..devices.guest_control import GuestControl
        from ..devices.rtc import Rtc
        from ..devices.serial import Serial

        vm = self.vm
        self.serial = Serial(vm.irq_line(layout.COM1_IRQ), self.console)
        vm.add_pio_device(layout.COM1_BASE, layout.COM1_LEN, self.serial)
        self.i8042 = i8042.I8042(          # keys: press_keys (Firecracker's SendCtrlAltDel)
            on_reset=self._guest_reset, kbd_irq=vm.irq_line(layout.I8042_KBD_IRQ),
            aux_irq=vm.irq_line(layout.I8042_AUX_IRQ))
        vm.add_pio_device(layout.I8042_BASE, layout.I8042_LEN, self.i8042)
        vm.add_pio_device(layout.RTC_BASE, layout.RTC_LEN, Rtc())
        self.guest_control = GuestControl(on_exit=self._guest_exit, on_progress=self._progress)
        vm.add_pio_device(layout.EXIT_PORT, 2, self.guest_control)
        self.acpi_pm = AcpiPm(on_poweroff=self._guest_poweroff)
        vm.add_pio_device(layout.ACPI_PM_BASE, layout.ACPI_PM_LEN, self.acpi_pm)

    def _add_virtio_devices(self) -> None:
        config = self.config
        if config.disks or config.console == "virtio" or config.rng or config.nets or \
                config.agent or config.shares or config.live_shares or config.rootfs or \
                config.vsock_cid or config.balloon:
            from ..devices.virtio import attach_virtio
            from ..net.plumbing import machine_key
            extra = self._agent_devices() + self._vsock_devices() + self._balloon_devices()
            try:
                self.virtio = attach_virtio(self.vm, self.memory,
                                            disks=config.disks + self._share_disks(),
                                            console=config.console == "virtio",
                                            rng=config.rng, console_output=self.console,
                                            nets=config.nets, net_key=machine_key(config),
                                            extra=extra,
                                            shares=config.live_shares + self._rootfs_shares(),
                                            transport=config.transport)
            except BaseException:
                if self.vsock is not None:    # its socket and thread, if not on the bus yet
                    self.vsock.close()
                if self.balloon is not None:
                    self.balloon.close()
                raise
            from ..devices.virtio.poll import configure
            for function in self.virtio.functions:    # avail-ring polling cap (0: off)
                configure(function, config.virtio_poll_us * 1000)
            if config.rng_rate_limit and self.virtio.rng is not None:
                from ..devices.rate_limiter import parse_rate_limit
                self.virtio.rng.limit(parse_rate_limit(config.rng_rate_limit))
            if self.balloon is not None:      # a new target raises a configuration interrupt
                transport = next(f for f in self.virtio.functions if f.device is self.balloon)
                self.balloon.config_changed = transport.config_changed

    def _balloon_devices(self) -> list:
        """The virtio-balloon (``config.balloon``: Firecracker's /balloon)."""
        if not self.config.balloon:
            return []
        from ..devices.virtio.balloon import BalloonDevice
        self.balloon = BalloonDevice(self.memory, self.config.balloon_spec())
        return [self.balloon]

    def _rootfs_shares(self) -> list:
        from ..share import rootfs_shares
        return rootfs_shares(self.config)

    def _agent_devices(self) -> list:
        """The agent's virtio-serial device (``--agent``; ``--share`` implies it)."""
        if not (self.config.agent or self.config.shares):
            return []
        from ..agent import agent_channel
        device, self.agent = agent_channel(alive=lambda: not self.vm.stop_requested)
        self.vm.on_close(lambda: self.agent.close("the VM was closed"))
        return [device]

    def _vsock_devices(self) -> list:
        """The virtio-vsock device (``--vsock``, Firecracker's PUT /vsock), its host socket
        listening; closed with the VM (its function's close)."""
        if not self.config.vsock_cid:
            return []
        from ..devices.virtio.vsock import open_vsock_device
        from ..vsock import VsockSpec
        self.vsock = open_vsock_device(VsockSpec(self.config.vsock_cid, self.config.vsock_uds))
        return [self.vsock]

    def _share_disks(self) -> list:
        """A read-only ext2 image per ``--share`` directory, removed when the VM closes."""
        if not self.config.shares:
            return []
        import shutil
        import tempfile
        from ..share import share_disks
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

    # --- running -----------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> Stop | None:
        interactive = self.stdin is not None
        if interactive:
            from ..console import HostConsole
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
            from ..agent import AgentUnavailable
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
