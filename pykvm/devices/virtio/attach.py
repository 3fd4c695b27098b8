"""How a machine gets its virtio devices: one call that creates PCI bus 0 and
puts a virtio-pci function on it for each disk, the console and the RNG -- or,
with transport "mmio", a virtio-mmio register page and IRQ for each instead."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConfigError
from ...machine.config import DiskSpec  # noqa: F401 - re-exported: pykvm.devices.virtio.DiskSpec
from ..pci.bus import PciBus
from .blk import BlockDevice
from .console import ConsoleDevice
from .net import NetDevice, open_net_devices
from .mmio import MmioDevices, VirtioMmioDevice
from .pci import VirtioPciDevice
from .rng import RngDevice
from .vhost_blk import open_vhost_blk, served_by_vhost_user

TRANSPORTS = ("pci", "mmio")   # pykvm run --transport; the Firecracker personality: mmio


@dataclass
class VirtioDevices:
    """What :func:`attach_virtio` created, for the machine to talk to."""

    pci: PciBus | None        # transport "pci": bus 0 with a function per device
    disks: list[BlockDevice] = field(default_factory=list)
    console: ConsoleDevice | None = None
    rng: RngDevice | None = None
    nets: list[NetDevice] = field(default_factory=list)
    shares: list = field(default_factory=list)    # FsDevice per live share (virtio-fs)
    functions: list[VirtioPciDevice | VirtioMmioDevice] = field(default_factory=list)
    extra: list = field(default_factory=list)     # attach_virtio(extra=...), in order
    mmio: MmioDevices | None = None   # transport "mmio": a register page + IRQ per device

    def transports(self) -> list:
        """Every device's transport, PCI functions (the host bridge too) or MMIO pages."""
        bus = self.pci if self.pci is not None else self.mmio
        return [transport for _, transport in bus.devices()]

    def cmdline(self) -> str:
        """What the guest kernel must be told: the MMIO devices (PCI is scanned)."""
        return self.mmio.cmdline() if self.mmio is not None else ""


def attach_virtio(vm, memory, *, disks: list[DiskSpec] = (), console: bool = False,
                  rng: bool = False, console_output=None, nets=(),
                  net_key: str = "", extra=(), shares=(),
                  transport: str = "pci") -> VirtioDevices:
    """Create PCI bus 0 on ``vm`` with the asked-for devices (``transport="mmio"``:
    virtio-mmio devices instead, pykvm/devices/virtio/mmio.py). Images are opened
    (and locked) here, so a bad --disk fails before the guest starts. Every
    thread and fd is released when the VM closes. ``extra``: more VirtioDevice
    instances (the guest agent's virtio-serial), put on the bus after the others.
    ``shares``: FsSpec of each live share (virtio-fs over vhost-user; back ends started
    or connected here, so a bad one fails before the guest starts)."""
    if transport not in TRANSPORTS:
        raise ConfigError(f"unknown virtio transport {transport!r} (use pci or mmio)")
    if console and console_output is None:
        raise ConfigError("a virtio console needs somewhere to write its output")
    devices: list = []
    try:
        for index, spec in enumerate(disks):
            if served_by_vhost_user(spec):      # qemu-storage-daemon or a running back end
                devices.append(open_vhost_blk(spec, f"virtio-blk{index}"))
                continue
            devices.append(BlockDevice(spec.path, read_only=spec.read_only, serial=spec.serial,
                                       name=f"virtio-blk{index}"))
        # NICs: TAPs opened and plumbed now, so a bad --net fails before the guest starts.
        nics = open_net_devices(nets, net_key, vm=vm)
        devices += nics
        fs_devices = []
        if shares:
            from .fs import open_fs_devices
            fs_devices = open_fs_devices(shares)
            devices += fs_devices
    except BaseException:
        for device in devices:
            device.close()
        raise
    result = VirtioDevices(PciBus(vm) if transport == "pci" else None,
                           mmio=MmioDevices(vm) if transport == "mmio" else None, disks=list(devices[:len(disks)]), nets=list(nics),
                           shares=list(fs_devices))
    if console:
        result.console = ConsoleDevice(console_output)
        devices.append(result.console)
    if rng:
        result.rng = RngDevice()
        devices.append(result.rng)
    result.extra = list(extra)
    devices += result.extra
    for position, device in enumerate(devices):
        # Functions already on the bus close with the VM; the rest close here.
        try:
            if result.mmio is not None:
                result.functions.append(result.mmio.add(memory, device))
                continue
            function = VirtioPciDevice(vm, memory, device)
        except BaseException:
            for left in devices[position:]:
                left.close()
            raise
        result.pci.add(function)
        result.functions.append(function)
    return result
