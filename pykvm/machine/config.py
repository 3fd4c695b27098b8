"""What a machine is made of, typed and checked before anything is created.

A :class:`MachineConfig` is complete before the builder (pykvm/machine/builder.py)
creates a VM: the CLI fills one from its options, the Firecracker API from its
pre-boot PUTs (machine-config, boot-source, drives, network-interfaces), a snapshot
from its ``config`` record. :meth:`MachineConfig.validate` is the one check all of
them pass through, so each way in refuses the same things with the same line.

The records a config holds are here too, each with the parser of its command-line
option: :class:`DiskSpec` (``--disk``), :class:`NetSpec` (``--net``). A snapshot saves
them under stable tags (pykvm/snapshot/config.py), never under their module path.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import layout
from ..boot.modes import MODES
from ..errors import ConfigError
from ..kvm import DEFAULT_DEVICE
from ..net.mac import format_mac, parse_mac  # noqa: F401 - re-exported with NetSpec
from ..net.netns import NETNS_DIR
from ..net.tap import valid_ifname

if TYPE_CHECKING:
    from ..devices.virtio.fs import FsSpec

DEFAULT_MEM = 512 * layout.MiB
MAX_CPUS = 255
# The guest's tsc_early_khz is the TSC's kHz times the slowdown, and Linux parses it as an
# unsigned 32-bit number (arch/x86/kernel/tsc.c): 100 keeps a 40 GHz TSC inside it.
MAX_CLOCK_SLOWDOWN = 100
CONSOLES = ("serial", "virtio")


# --- disks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskSpec:
    """A --disk argument: PATH[,ro][,serial=ID][,format=raw|qcow2][,backend=vhost-user], or
    vhost-user=SOCKET[,ro] (the path itself may not contain commas). A qcow2 image (by
    content unless ``format=`` says), ``backend=vhost-user`` and a SOCKET are served over
    vhost-user (pykvm/devices/virtio/vhost_blk.py), the rest by pykvm's own virtio-blk."""

    path: str
    read_only: bool = False
    serial: str = ""
    format: str = ""                # "" = by content (the qcow2 magic), "raw", "qcow2"
    backend: str = ""               # "" = by format, "pykvm", "vhost-user"
    socket: str = ""                # vhost-user=SOCKET: a running back end (path is "")

    USAGE = "PATH[,ro][,serial=ID][,format=raw|qcow2][,backend=vhost-user] or vhost-user=SOCKET"

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        path, *options = text.split(",")
        socket = path[len("vhost-user="):] if path.startswith("vhost-user=") else ""
        if not path or path == "vhost-user=":
            raise ConfigError(f"--disk {text!r}: no image path (use {cls.USAGE})")
        from ..devices.virtio.blk import VIRTIO_BLK_ID_BYTES

        read_only, serial, fmt, backend = False, "", "", "vhost-user" if socket else ""
        for option in options:
            if option == "ro":
                read_only = True
            elif option == "rw":
                read_only = False
            elif option.startswith("serial="):
                serial = option[len("serial="):]
                if not re.fullmatch(r"[\x21-\x7e]{1,%d}" % VIRTIO_BLK_ID_BYTES, serial):
                    raise ConfigError(f"--disk {text!r}: serial must be 1 to {VIRTIO_BLK_ID_BYTES} "
                                      f"printable ASCII characters without spaces")
            elif option in ("format=raw", "format=qcow2") and not socket:
                fmt = option[len("format="):]
            elif option in ("backend=pykvm", "backend=vhost-user") and not socket:
                backend = option[len("backend="):]
            else:
                raise ConfigError(f"--disk {text!r}: unknown option {option!r} "
                                  f"(use {cls.USAGE})")
        if (fmt, backend) == ("qcow2", "pykvm"):
            raise ConfigError(f"--disk {text!r}: pykvm's own virtio-blk reads raw images only "
                              f"(qemu-storage-daemon serves a qcow2 one: backend=vhost-user)")
        return cls("" if socket else path, read_only, serial, fmt, backend, socket)

    def option_text(self) -> str:
        """The --disk text that parses back to this spec."""
        return ",".join([f"vhost-user={self.socket}" if self.socket else self.path]
                        + (["ro"] if self.read_only else [])
                        + ([f"serial={self.serial}"] if self.serial else [])
                        + ([f"format={self.format}"] if self.format else [])
                        + ([f"backend={self.backend}"] if self.backend and not self.socket
                           else []))


# --- NICs ------------------------------------------------------------------------------------

def parse_cidr(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """'10.0.2.2/24' -> an address with its prefix; the prefix is required."""
    if "/" not in text:
        raise ConfigError(f"host-ip {text!r}: give an address with its prefix length, "
                          f"e.g. 10.0.2.2/24")
    try:
        interface = ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigError(f"host-ip {text!r} is not an address/prefix (e.g. 10.0.2.2/24 "
                          f"or fd00::2/64)") from None
    if interface.ip.is_multicast or interface.ip.is_unspecified:
        raise ConfigError(f"host-ip {text}: not a host address")
    return interface


NET_USAGE = ("tap[=NAME][,mac=MAC][,bridge=BR][,host-ip=CIDR][,netns=NS], "
             "user[,mac=MAC][,fwd=tcp|udp:HOSTPORT:GUESTPORT]...[,map-gw=off] "
             "or passt=SOCKET[,mac=MAC]")
USER_OPTIONS = {"user": ("mac", "fwd", "map-gw"), "passt": ("mac",)}


@dataclass(frozen=True)
class NetSpec:
    """One --net argument (the host side of a virtio-net NIC: pykvm/net/plumbing.py)."""

    tap: str | None = None                 # None: a new TAP named pykvmN by the kernel
    mac: bytes | None = None               # None: default_mac(machine, index)
    bridge: str | None = None
    host_ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    netns: str | None = None
    mode: str = "tap"                      # "tap", "user" (pykvm starts passt), "passt"
    forwards: tuple = ()                   # passt.Forward of each fwd= (user)
    passt_socket: str | None = None        # passt=SOCKET
    map_gw: bool = True                    # user: the gateway address reaches the host

    @classmethod
    def parse(cls, text: str) -> "NetSpec":
        kind, *options = text.split(",")
        backend, _, tap = kind.partition("=")
        if backend in USER_OPTIONS:
            return cls._parse_user(text, backend, _, tap, options)
        if backend != "tap":
            raise ConfigError(f"--net {text!r}: unknown backend {backend!r} (use {NET_USAGE})")
        if _ and not tap:
            raise ConfigError(f"--net {text!r}: empty TAP name after tap=")
        values: dict = {"tap": tap or None}
        if tap and not valid_ifname(tap):
            raise ConfigError(f"--net {text!r}: {tap!r} is not a valid interface name "
                              f"(1 to 15 characters, no '/', ':' or spaces)")
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or not value:
                raise ConfigError(f"--net {text!r}: option {option!r} needs a value "
                                  f"(use {NET_USAGE})")
            if key in ("mac", "bridge", "host-ip", "netns") and key.replace("-", "_") in values:
                raise ConfigError(f"--net {text!r}: {key} given twice")
            if key == "mac":
                values["mac"] = parse_mac(value)
            elif key == "bridge":
                if not valid_ifname(value) or "%" in value:
                    raise ConfigError(f"--net {text!r}: {value!r} is not a valid bridge name")
                values["bridge"] = value
            elif key == "host-ip":
                values["host_ip"] = parse_cidr(value)
            elif key == "netns":
                if "/" in value or value in (".", ".."):
                    raise ConfigError(f"--net {text!r}: {value!r} is not a namespace name "
                                      f"(a name under {NETNS_DIR}, as `ip netns add` makes)")
                values["netns"] = value
            else:
                raise ConfigError(f"--net {text!r}: unknown option {key!r} (use {NET_USAGE})")
        return cls(**values)

    @classmethod
    def _parse_user(cls, text: str, mode: str, equals: str, value: str,
                    options: list[str]) -> "NetSpec":
        """``user[,...]`` and ``passt=SOCKET[,...]``."""
        from ..net.passt import Forward

        if mode == "user" and equals:
            raise ConfigError(f"--net {text!r}: user takes no value (use {NET_USAGE})")
        if mode == "passt" and not value:
            raise ConfigError(f"--net {text!r}: give passt's socket: passt=SOCKET")
        values: dict = {"mode": mode, "passt_socket": value or None}
        forwards: list = []
        for option in options:
            key, sep, argument = option.partition("=")
            if not sep or not argument:
                raise ConfigError(f"--net {text!r}: option {option!r} needs a value "
                                  f"(use {NET_USAGE})")
            if key not in USER_OPTIONS[mode]:
                raise ConfigError(f"--net {text!r}: {mode} has no option {key!r} "
                                  f"(use {NET_USAGE})")
            if key == "fwd":
                forward = Forward.parse(argument)
                if any((f.protocol, f.host_port) == (forward.protocol, forward.host_port)
                       for f in forwards):
                    raise ConfigError(f"--net {text!r}: host port {forward.protocol} "
                                      f"{forward.host_port} is forwarded twice")
                forwards.append(forward)
                continue
            if key.replace("-", "_") in values:
                raise ConfigError(f"--net {text!r}: {key} given twice")
            if key == "mac":
                values["mac"] = parse_mac(argument)
            elif argument not in ("on", "off"):
                raise ConfigError(f"--net {text!r}: map-gw is on or off")
            else:
                values["map_gw"] = argument == "on"
        return cls(forwards=tuple(forwards), **values)


# --- the machine -----------------------------------------------------------------------------
@dataclass
class MachineConfig:
    """Everything that decides what machine is built. Host resources (disk images, TAPs,
    shared directories) are named here and opened by the builder, not before."""

    mem_size: int = DEFAULT_MEM
    cpus: int = 1
    flat: Path | None = None
    entry: str = "real"                 # a flat binary's CPU mode (boot/modes.py MODES)
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    clock_slowdown: int = 0             # the guest's clock runs N times slower (0: the host
                                        # kind's default, quirks.clock_slowdown; boot.py)
    command: str | None = None          # `pykvm run -- CMD`: a shell command line for the guest
    kvm_device: str = DEFAULT_DEVICE
    stats: bool = False
    verbose: bool = False               # stream the boot log in command mode
    extract_kernel: bool = True         # bzImage: load the extracted vmlinux (skip the decompressor)
    disks: list[DiskSpec] = field(default_factory=list)   # one virtio-blk disk each
    console: str = "serial"             # the guest console: "serial" (ttyS0) or "virtio" (hvc0)
    rng: bool = False                   # a virtio-rng device
    rng_rate_limit: str = ""            # its token buckets (devices/rate_limiter.py's text form)
    nets: list[NetSpec] = field(default_factory=list)     # one virtio-net NIC each (pykvm/net)
    agent: bool = False                 # the guest agent's channel (pykvm/agent.py): exec, files
    shares: list[str] = field(default_factory=list)       # host dirs, read-only at /mnt/share... (pykvm/share.py)
    live_shares: list[FsSpec] = field(default_factory=list)  # virtio-fs over vhost-user (devices/virtio/fs.py)
    rootfs: str = ""                    # --rootfs DIR: the guest's root over virtio-fs (pykvm/share.py)
    workdir: str = ""                   # with rootfs: shared read-write, the command runs there
    transport: str = "pci"              # virtio over "pci" or "mmio" (devices/virtio/mmio.py)
    vsock_cid: int = 0                  # --vsock: the guest's CID (0: no virtio-vsock device)
    vsock_uds: str = ""                 # its host Unix socket ("": a private one; pykvm/vsock)
    keyboard: bool = False              # the firmware tells the guest of the i8042 (its keyboard)
    balloon: bool = False               # a virtio-balloon device (devices/virtio/balloon.py)
    balloon_mib: int = 0                # its first target, MiB
    balloon_deflate_on_oom: bool = False
    balloon_stats_s: int = 0            # its statistics interval, s (0: no statistics queue)
    virtio_poll_us: int = 32            # virtio queues' avail-ring polling cap, µs (0: off; devices/virtio/poll.py)

    def validate(self) -> None:
        """ConfigError (one line) for a config no machine can be built from."""
        if self.mem_size <= 0 or self.mem_size % layout.PAGE_SIZE:
            raise ConfigError(f"memory size {self.mem_size} bytes is not a multiple of 4 KiB")
        minimum = layout.MIN_LINUX_MEM if self.kernel else layout.MIN_MEM_SIZE
        if self.mem_size < minimum:
            raise ConfigError(f"memory size {format_size(self.mem_size)} is too small "
                              f"(at least {format_size(minimum)} for this guest)")
        if self.mem_size > layout.MAX_MEM_SIZE:
            raise ConfigError(f"memory size {format_size(self.mem_size)} is too large")
        if not 0 <= self.clock_slowdown <= MAX_CLOCK_SLOWDOWN:
            raise ConfigError(f"--clock-slowdown {self.clock_slowdown}: must be between 1 and "
                              f"{MAX_CLOCK_SLOWDOWN} (0: the host's default)")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ConfigError(f"--cpus {self.cpus}: must be between 1 and {MAX_CPUS}")
        if (self.flat is None) == (self.kernel is None):
            raise ConfigError("give exactly one of --flat FILE or --kernel FILE")
        if self.flat is not None and self.entry not in MODES:
            raise ConfigError(f"--entry {self.entry}: must be one of {', '.join(MODES)}")
        if self.console not in CONSOLES:
            raise ConfigError(f"--console {self.console}: must be serial or virtio")
        if self.transport not in ("pci", "mmio"):
            raise ConfigError(f"--transport {self.transport}: must be pci or mmio")
        if not 0 <= self.virtio_poll_us <= 1000:
            raise ConfigError(f"--virtio-poll-us {self.virtio_poll_us}: must be 0 (off) to 1000")
        if (self.agent or self.shares or self.live_shares or self.rootfs) and \
                self.flat is not None:
            raise ConfigError("--agent and --share need a Linux guest (the agent runs in it)")
        self._check_records()
        if self.balloon:
            self.balloon_spec()
        if self.rng_rate_limit:
            from ..devices.rate_limiter import parse_rate_limit
            try:
                parse_rate_limit(self.rng_rate_limit)
            except ValueError as error:
                raise ConfigError(f"virtio-rng: {error}") from None
        if self.vsock_cid or self.vsock_uds:
            from ..vsock import VsockSpec
            VsockSpec(self.vsock_cid, self.vsock_uds)     # ConfigError if it is not one

    def balloon_spec(self):
        """The virtio-balloon's BalloonSpec (ConfigError for a target beyond RAM)."""
        from ..devices.virtio.balloon import MAX_STATS_INTERVAL_S, BalloonSpec, mib_to_pages
        if not 0 <= self.balloon_mib <= self.mem_size // layout.MiB:
            raise ConfigError(f"balloon target {self.balloon_mib} MiB: more than the guest's "
                              f"{format_size(self.mem_size)}")
        if not 0 <= self.balloon_stats_s <= MAX_STATS_INTERVAL_S:
            raise ConfigError(f"balloon statistics interval {self.balloon_stats_s} s: at most "
                              f"{MAX_STATS_INTERVAL_S}")
        return BalloonSpec(target_pages=mib_to_pages(self.balloon_mib),
                           deflate_on_oom=self.balloon_deflate_on_oom,
                           stats_interval_s=self.balloon_stats_s)

    def _check_records(self) -> None:
        """Each list holds its own kind of record (a stray dict or string from a caller
        that skipped the parsers would otherwise surface deep inside a device)."""
        for name, kind in (("disks", DiskSpec), ("nets", NetSpec), ("shares", str)):
            items = getattr(self, name)
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"MachineConfig.{name}: a list of {kind.__name__}, "
                                  f"not {type(items).__name__}")
            wrong = next((item for item in items if not isinstance(item, kind)), None)
            if wrong is not None:
                raise ConfigError(f"MachineConfig.{name}: {str(wrong)[:40]!r} is not a "
                                  f"{kind.__name__}")


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
