"""The ``linux_vm`` fixture's guest: :class:`LinuxVm` (a running Linux guest whose
agent answers) and the :class:`~pykvm.warm.guest.GuestSpec` a test's markers and the
plugin's options describe (:func:`linux_spec`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pykvm.warm.guest import ConsoleLog, GuestSpec, RunningGuest

from .options import option

DEFAULT_LINUX_MEM = "256M"
REPORT_TAIL = 16 * 1024           # console bytes a failure report shows
BOOT_LOG_TAIL = 4 * 1024          # ... and of a restored guest's boot log


class LinuxVm(RunningGuest):
    """A running Linux guest with its agent (the ``linux_vm`` fixture; pykvm/warm/guest.py
    boots and restores it)."""

    def __init__(self, machine, console: ConsoleLog, origin: str = "booted for this test",
                 boot_log: str = ""):
        self.origin = origin            # "booted", "restored from DIR" or "shared ..."
        self.snapshot: Path | None = None   # DIR, for a restored guest
        self.boot_log = boot_log
        super().__init__(machine, console)

    # the agent
    def exec(self, command, timeout: float | None = 600.0, **options):
        """Run ``command`` in the guest: see pykvm.agent.AgentClient.exec."""
        return self.machine.exec(command, timeout=timeout, **options)

    def put_file(self, guest_path: str, data: bytes, mode: int = 0o644) -> None:
        self.machine.put_file(guest_path, data, mode)

    def get_file(self, guest_path: str) -> bytes:
        return self.machine.get_file(guest_path)

    def copy_in(self, host_path, guest_path: str) -> None:
        self.machine.copy_in(host_path, guest_path)

    def copy_out(self, guest_path: str, host_path) -> None:
        self.machine.copy_out(guest_path, host_path)

    def console_text(self) -> str:
        parts = [f"(guest {self.origin})"]
        if self.boot_log:
            parts.append(f"--- boot log (tail) ---\n{self.boot_log[-BOOT_LOG_TAIL:]}")
        parts.append(f"--- console during the test ---\n{self.console.text(REPORT_TAIL)}")
        return "\n".join(parts)


def linux_spec(request) -> GuestSpec:
    from pykvm.devices.virtio import DiskSpec
    from pykvm.machine import default_guest_dir, parse_size
    from pykvm.machine.boot import guest_files

    config = request.config
    kernel = option(config, "pykvm_kernel", "PYKVM_KERNEL")
    initrd = option(config, "pykvm_initrd", "PYKVM_INITRD")
    directory = default_guest_dir()
    default_kernel, default_initrd = guest_files(directory) if directory else (None, None)
    if kernel is None:
        if directory is None:
            # KVM works (pykvm_device came first): this is a missed set-up step, not a host
            # that cannot run guests, so it fails rather than skips
            pytest.fail("no Linux guest for linux_vm: the default guest is not built; run "
                        "`pykvm guest build` (or pass --pykvm-kernel PATH)", pytrace=False)
        kernel = str(default_kernel)
    if initrd is None and default_initrd is not None:
        initrd = str(default_initrd)     # its /init starts the agent
    node = request.node

    def last(name, default):
        marker = node.get_closest_marker(name)
        return marker.args[0] if marker is not None and marker.args else default

    disks = []
    for marker in node.iter_markers("pykvm_disk"):
        if not marker.args:
            raise pytest.UsageError("pykvm_disk needs the image path")
        disks.append(DiskSpec(str(Path(marker.args[0]).absolute()),
                              read_only=bool(marker.kwargs.get("read_only", False)),
                              serial=str(marker.kwargs.get("serial", ""))))
    nets = []
    for marker in node.iter_markers("pykvm_net"):
        from pykvm.net.plumbing import NetSpec
        nets.append(NetSpec.parse(str(marker.args[0])))
    if not nets and option(config, "pykvm_net", "PYKVM_NET"):
        from pykvm.net.plumbing import NetSpec
        nets.append(NetSpec.parse(option(config, "pykvm_net", "PYKVM_NET")))
    shares = [str(Path(marker.args[0]).absolute()) for marker in node.iter_markers("pykvm_share")]
    return GuestSpec(kernel=str(Path(kernel).absolute()),
                      initrd=str(Path(initrd).absolute()) if initrd else None,
                      append=option(config, "pykvm_append", "PYKVM_APPEND") or "",
                      mem=parse_size(str(last("pykvm_mem", DEFAULT_LINUX_MEM))),
                      cpus=int(last("pykvm_cpus", 1)), disks=tuple(disks), nets=tuple(nets),
                      shares=tuple(reversed(shares)))
