"""Firecracker's request bodies as typed, frozen records, parsed strictly (by
pykvm/api/firecracker/record.py's reader).

The field names, types, required fields and defaults are those of Firecracker's
swagger (``src/api_server/swagger/firecracker.yaml``, definitions MachineConfiguration,
BootSource, Drive, PartialDrive, NetworkInterface, InstanceActionInfo, Vm,
SnapshotCreateParams, SnapshotLoadParams, Logger, Metrics). A body is refused whole,
with one :class:`ApiFault` line, when it has a field the definition does not name, a
value of the wrong JSON type, or misses a required field: Firecracker's serde
parser refuses the same bodies (``deny_unknown_fields``), and a field pykvm silently
ignored would be a setting the client believes it made. Fields pykvm does not
implement yet (huge pages...) are accepted only at
their "off" value and refused otherwise, naming what is missing.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from . import LEVELS  # (defined there for the CLI's parser)
# The reader (record.py); every name is importable from here too, as before the split.
from .record import (DESERIALIZE, MAX_ID_LENGTH, MAX_LIST, MAX_PATH_LENGTH, REQUIRED, ApiFault,
                     Record, check_id, patched, path_id_matches, spec)

MAX_VCPUS = 32               # Firecracker's MAX_SUPPORTED_VCPUS
MAX_ARGS_LENGTH = 4096       # a kernel command line (COMMAND_LINE_SIZE on x86 is 2048)
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
USER_NET = "pykvm:"          # host_dev_name prefix of a pykvm back end (see NetworkInterface)


# --- the resources -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenBucket(Record):
    """Swagger TokenBucket: ``size`` tokens (bytes or requests), all refilled in
    ``refill_time`` ms, ``one_time_burst`` more once (pykvm/devices/rate_limiter.py)."""

    size: int = spec(int)
    one_time_burst: int | None = spec(int, None)
    refill_time: int = spec(int)

    def check(self) -> None:
        if max(self.size, self.refill_time, self.one_time_burst or 0) >= 1 << 64:
            raise ApiFault(f"{DESERIALIZE}: a token bucket value is larger than a u64")


@dataclass(frozen=True)
class RateLimiter(Record):
    """Swagger RateLimiter: a bucket for bytes and one for operations (either optional)."""

    bandwidth: TokenBucket | None = spec(TokenBucket, None)
    ops: TokenBucket | None = spec(TokenBucket, None)


@dataclass(frozen=True)
class MachineConfiguration(Record):
    """PUT/PATCH/GET /machine-config. pykvm has no SMT topology, CPU templates or huge
    pages: those are accepted at their defaults only."""

    vcpu_count: int = spec(int)
    mem_size_mib: int = spec(int)
    smt: bool = spec(bool, False)
    track_dirty_pages: bool = spec(bool, False)
    cpu_template: str | None = spec(str, None, ("None", "C3", "T2", "T2S", "T2CL", "T2A", "V1N1"))
    huge_pages: str = spec(str, "None", ("None", "2M"))

    def check(self) -> None:
        if not 1 <= self.vcpu_count <= MAX_VCPUS:
            raise ApiFault(f"The vCPU number is invalid! The vCPU number can only be 1 or an "
                           f"even number when SMT is enabled, and at most {MAX_VCPUS}.")
        if self.mem_size_mib == 0:
            raise ApiFault("The memory size (MiB) is invalid.")
        if self.smt:
            raise ApiFault("smt: pykvm does not model SMT siblings (give false)")
        if self.cpu_template not in (None, "None"):
            raise ApiFault(f"cpu_template {self.cpu_template}: CPU templates are not "
                           f"supported by pykvm")
        if self.huge_pages != "None":
            raise ApiFault("huge_pages: pykvm backs guest RAM with 4 KiB pages only (give None)")


DEFAULT_MACHINE = MachineConfiguration(vcpu_count=1, mem_size_mib=128)


@dataclass(frozen=True)
class BootSource(Record):
    kernel_image_path: str = spec(str)
    boot_args: str | None = spec(str, None)
    initrd_path: str | None = spec(str, None)

    def check(self) -> None:
        if self.boot_args is not None and len(self.boot_args) > MAX_ARGS_LENGTH:
            raise ApiFault(f"boot_args: longer than {MAX_ARGS_LENGTH} bytes")


@dataclass(frozen=True)
class Drive(Record):
    drive_id: str = spec(str)
    path_on_host: str | None = spec(str, None)
    is_root_device: bool = spec(bool)
    partuuid: str | None = spec(str, None)
    is_read_only: bool | None = spec(bool, None)
    cache_type: str = spec(str, "Unsafe", ("Unsafe", "Writeback"))
    io_engine: str = spec(str, "Sync", ("Sync", "Async"))
    rate_limiter: RateLimiter | None = spec(RateLimiter, None)
    socket: str | None = spec(str, None)     # a vhost-user-blk back end's socket

    def check(self) -> None:
        """A virtio-block drive has ``path_on_host``, a vhost-user-block one ``socket``
        (served by a back end the client runs, as ``--disk vhost-user=SOCKET``), never
        both; the queue of the latter is in the back end, out of a rate limiter's reach."""
        check_id(self.drive_id, "drive")
        if (self.path_on_host is None) == (self.socket is None):
            raise ApiFault("path_on_host or socket: exactly one is required (socket: a "
                           "vhost-user-block drive)")
        if self.socket is not None and self.rate_limiter is not None:
            raise ApiFault("rate_limiter: a vhost-user-block drive (socket) cannot be "
                           "rate-limited: its back end serves the queue")
        if self.partuuid is not None and not re.match(r"^[0-9A-Fa-f-]{1,64}$", self.partuuid):
            raise ApiFault("partuuid: not a partition UUID")

    @property
    def read_only(self) -> bool:
        return bool(self.is_read_only)

    def disk_spec(self):
        """The pykvm ``--disk`` this drive is: ``socket`` is ``vhost-user=SOCKET``; a
        qcow2 image is served by qemu-storage-daemon over vhost-user as for ``--disk``.
        A vhost-user back end answers GET_ID itself, so neither carries the drive_id
        as its serial."""
        from ...devices.virtio import DiskSpec
        from ...devices.virtio.vhost_blk import probe_format
        if self.socket is not None:
            return DiskSpec(path="", socket=self.socket, backend="vhost-user",
                            read_only=self.read_only)
        return DiskSpec(path=self.path_on_host, read_only=self.read_only,
                        serial="" if probe_format(self.path_on_host) == "qcow2"
                        else self.drive_id[:20])


@dataclass(frozen=True)
class PartialDrive(Record):
    drive_id: str = spec(str)
    path_on_host: str | None = spec(str, None)
    rate_limiter: RateLimiter | None = spec(RateLimiter, None)


@dataclass(frozen=True)
class NetworkInterface(Record):
    """PUT /network-interfaces/{id}. ``host_dev_name`` names an existing TAP, as in
    Firecracker, or is pykvm's extension ``pykvm:user[,fwd=tcp|udp:H:G]...[,map-gw=off]``:
    user networking through a passt process pykvm starts (the options of ``--net user``,
    pykvm/net/plumbing.py; the MAC stays in ``guest_mac``). The extension lives in this
    string, not in a field of its own, because Firecracker SDKs build bodies from typed
    structs that pass host_dev_name through but cannot add a field; and it cannot name
    a real TAP: the kernel refuses ':' in interface names (dev_valid_name), so a host
    with a TAP of any name keeps Firecracker's meaning, and real Firecracker refuses the
    body instead of doing something else with it."""

    iface_id: str = spec(str)
    host_dev_name: str = spec(str)
    guest_mac: str | None = spec(str, None)
    rx_rate_limiter: RateLimiter | None = spec(RateLimiter, None)
    tx_rate_limiter: RateLimiter | None = spec(RateLimiter, None)

    def check(self) -> None:
        check_id(self.iface_id, "network interface")
        if self.guest_mac is not None and not _MAC.match(self.guest_mac):
            raise ApiFault(f"{DESERIALIZE}: invalid MAC address {self.guest_mac[:40]!r}")
        if self.guest_mac is not None and int(self.guest_mac[:2], 16) & 1:
            raise ApiFault(f"guest_mac {self.guest_mac}: a multicast address cannot be a NIC's")
        self.net_spec()

    @property
    def mac_bytes(self) -> bytes | None:
        return None if self.guest_mac is None else bytes.fromhex(self.guest_mac.replace(":", ""))

    def net_spec(self):
        """pykvm's NetSpec of this NIC: the TAP ``host_dev_name``, or user networking
        for ``pykvm:user[,...]``."""
        from ...errors import ConfigError
        from ...net.plumbing import NetSpec
        name = self.host_dev_name
        if not name.startswith(USER_NET):
            return NetSpec(tap=name, mac=self.mac_bytes)
        try:
            net = NetSpec.parse(name[len(USER_NET):])
        except ConfigError as error:
            raise ApiFault(f"host_dev_name {name[:80]!r}: {str(error)[:200]}") from None
        if net.mode != "user":
            raise ApiFault(f"host_dev_name {name[:80]!r}: pykvm's only back end here is "
                           f"{USER_NET}user[,fwd=tcp|udp:HOSTPORT:GUESTPORT]...[,map-gw=off]")
        if net.mac is not None:
            raise ApiFault(f"host_dev_name {name[:80]!r}: give the MAC in guest_mac")
        if len(net.forwards) > MAX_LIST:
            raise ApiFault(f"host_dev_name: at most {MAX_LIST} fwd= options")
        return dataclasses.replace(net, mac=self.mac_bytes)


@dataclass(frozen=True)
class PartialNetworkInterface(Record):
    iface_id: str = spec(str)
    rx_rate_limiter: RateLimiter | None = spec(RateLimiter, None)
    tx_rate_limiter: RateLimiter | None = spec(RateLimiter, None)


ACTIONS = ("FlushMetrics", "InstanceStart", "SendCtrlAltDel")


@dataclass(frozen=True)
class InstanceActionInfo(Record):
    action_type: str = spec(str, REQUIRED, ACTIONS)


@dataclass(frozen=True)
class VmState(Record):
    state: str = spec(str, REQUIRED, ("Paused", "Resumed"))


@dataclass(frozen=True)
class SnapshotCreateParams(Record):
    snapshot_path: str = spec(str)
    mem_file_path: str = spec(str)
    snapshot_type: str = spec(str, "Full", ("Full", "Diff"))
    version: str | None = spec(str, None)

    def check(self) -> None:
        if self.snapshot_type != "Full":
            raise ApiFault("snapshot_type Diff: pykvm takes full snapshots only")


@dataclass(frozen=True)
class MemBackend(Record):
    backend_type: str = spec(str, REQUIRED, ("File", "Uffd"))
    backend_path: str = spec(str)

    def check(self) -> None:
        if self.backend_type != "File":
            raise ApiFault("mem_backend Uffd: pykvm loads guest memory from a File only")


@dataclass(frozen=True)
class NetworkOverride(Record):
    iface_id: str = spec(str)
    host_dev_name: str = spec(str)


@dataclass(frozen=True)
class SnapshotLoadParams(Record):
    snapshot_path: str = spec(str)
    mem_file_path: str | None = spec(str, None)
    mem_backend: MemBackend | None = spec(MemBackend, None)
    enable_diff_snapshots: bool = spec(bool, False)
    track_dirty_pages: bool = spec(bool, False)
    resume_vm: bool = spec(bool, False)
    network_overrides: tuple = spec(("list", NetworkOverride), ())

    def check(self) -> None:
        if (self.mem_file_path is None) == (self.mem_backend is None):
            raise ApiFault("Invalid snapshot load request: give exactly one of mem_file_path "
                           "and mem_backend")

    @property
    def memory_path(self) -> str:
        return self.mem_file_path if self.mem_file_path is not None else \
            self.mem_backend.backend_path




@dataclass(frozen=True)
class Logger(Record):
    log_path: str | None = spec(str, None)
    level: str = spec(str, "Info")
    show_level: bool = spec(bool, False)
    show_log_origin: bool = spec(bool, False)
    module: str | None = spec(str, None)

    def check(self) -> None:
        if self.level.title() not in LEVELS and self.level.upper() != "WARN":
            raise ApiFault(f"{DESERIALIZE}: unknown variant `{self.level[:20]}`, expected one "
                           f"of {', '.join(f'`{v}`' for v in LEVELS)}")


@dataclass(frozen=True)
class Metrics(Record):
    metrics_path: str = spec(str)
