"""How a machine gets its virtio devices: one call that creates PCI bus 0 and
puts a virtio-pci function on it for each disk, the console and the RNG."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import ConfigError
from ..pci.bus import PciBus
from .blk import VIRTIO_BLK_ID_BYTES, BlockDevice
from .console import ConsoleDevice
from .net import NetDevice, open_net_devices
from .pci import VirtioPciDevice
from .rng import RngDevice

_SERIAL = re.compile(r"^[\x21-\x7e]{1,%d}$" % VIRTIO_BLK_ID_BYTES)


@dataclass(frozen=True)
class DiskSpec:
    """A --disk argument: PATH[,ro][,serial=ID] (the path itself may not contain commas)."""

    path: str
    read_only: bool = False
    serial: str = ""

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        path, *options = text.split(",")
        if not path:
            raise ConfigError(f"--disk {text!r}: no image path (use PATH[,ro][,serial=ID])")
        read_only, serial = False, ""
        for option in options:
            if option == "ro":
                read_only = True
            elif option == "rw":
                read_only = False
            elif option.startswith("serial="):
                serial = option[len("serial="):]
                if not _SERIAL.match(serial):
                    raise ConfigError(f"--disk {text!r}: serial must be 1 to {VIRTIO_BLK_ID_BYTES} "
                                      f"printable ASCII characters without spaces")
            else:
                raise ConfigError(f"--disk {text!r}: unknown option {option!r} "
                                  f"(use PATH[,ro][,serial=ID])")
        return cls(path, read_only, serial)


@dataclass
class VirtioDevices:
    """What :func:`attach_virtio` created, for the machine to talk to."""

    pci: PciBus
    disks: list[BlockDevice] = field(default_factory=list)
    console: ConsoleDevice | None = None
    rng: RngDevice | None = None
    nets: list[NetDevice] = field(default_factory=list)
    shares: list = field(default_factory=list)    # FsDevice per live share (virtio-fs)
    functions: list[VirtioPciDevice] = field(default_factory=list)
    extra: list = field(default_factory=list)     # attach_virtio(extra=...), in order


def attach_virtio(vm, memory, *, disks: list[DiskSpec] = (), console: bool = False,
                  rng: bool = False, console_output=None, nets=(),
                  net_key: str = "", extra=(), shares=()) -> VirtioDevices:
    """Create PCI bus 0 on ``vm`` with the asked-for devices. Images are opened
    (and locked) here, so a bad --disk fails before the guest starts. Every
    thread and fd is released when the VM closes. ``extra``: more VirtioDevice
    instances (the guest agent's virtio-serial), put on the bus after the others.
    ``shares``: FsSpec of each live share (virtio-fs over vhost-user; back ends started
    or connected here, so a bad one fails before the guest starts)."""
    if console and console_output is None:
        raise ConfigError("a virtio console needs somewhere to write its output")
    devices: list = []
    try:
        for index, spec in enumerate(disks):
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
    result = VirtioDevices(PciBus(vm), disks=list(devices[:len(disks)]), nets=list(nics),
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
            function = VirtioPciDevice(vm, memory, device)
        except BaseException:
            for left in devices[position:]:
                left.close()
            raise
        result.pci.add(function)
        result.functions.append(function)
    return result
