"""Host resources on restore: taken from the caller, not from the snapshot.

A snapshot's ``config`` names things on the host: disk image paths and whether the
guest may write them, directories shared into the guest, TAP devices, bridges,
addresses and namespaces. Its checksum only says the file is whole; anyone who can
hand a user a snapshot can write any of them. Restoring them as written would let a
snapshot re-point a disk at ``~/.ssh/id_ed25519`` or ``/dev/sda`` and make it
writable, show a directory of the user's to the guest, or plumb the host's network.

So, as Firecracker's snapshot-load overrides do, the host side comes from the caller
(the command line: ``--disk``, ``--share``, ``--net``), matched to the snapshot's
devices in order, and the guest side (what the guest already saw: a disk's serial
and size, a NIC's MAC) from the snapshot:

* a kind of resource the snapshot has and the caller did not override is refused,
  with a list of what the snapshot names, unless the caller trusts the snapshot
  (``--trust-snapshot``, ``restore_machine(..., trust=True)``: the snapshot is one
  you took yourself and kept where nobody else could change it);
* an override gives as many resources as the snapshot has, in its order;
* a disk read-only in the snapshot stays read-only (an override may make a disk
  read-only, never read-write): the guest was told it cannot write, and trusting the
  file must never be what widens access;
* ``/dev/kvm`` is always the caller's (``--device``), never the snapshot's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .state import SnapshotError


@dataclass(frozen=True)
class HostOverrides:
    """The host side of a restore; None for a kind: not given (the snapshot's, if trusted)."""

    disks: tuple | None = None          # DiskSpec per snapshot disk, in order
    nets: tuple | None = None           # NetSpec per snapshot NIC, in order
    shares: tuple | None = None         # a host directory per snapshot share, in order

    @classmethod
    def of(cls, disks=None, nets=None, shares=None) -> "HostOverrides":
        return cls(*(None if given is None else tuple(given) for given in (disks, nets, shares)))


def describe(config) -> list[str]:
    """What the configuration takes from the host, one phrase per resource."""
    named = [f"disk {d.path} ({'read-only' if d.read_only else 'read-write'})"
             for d in config.disks]
    named += [f"share {share}" for share in config.shares]
    named += [f"net {_net(n)}" for n in config.nets]
    return named


def _net(net) -> str:
    parts = [f"tap={net.tap}" if net.tap else "tap"]
    parts += [f"{key}={value}" for key, value in (("bridge", net.bridge),
                                                  ("host-ip", net.host_ip),
                                                  ("netns", net.netns)) if value]
    return ",".join(parts)


def confirm(config, overrides: HostOverrides, trust: bool, directory) -> None:
    """Put the caller's host resources into ``config`` (the snapshot's, decoded) or
    refuse: SnapshotError of one line that lists what the snapshot names."""
    unconfirmed = []
    for kind, option in (("disks", "--disk"), ("shares", "--share"), ("nets", "--net")):
        saved, given = getattr(config, kind), getattr(overrides, kind)
        if given is None:
            if saved and not trust:
                unconfirmed.append(kind)
            continue
        if len(given) != len(saved):
            raise SnapshotError(f"{directory}: the snapshot has {len(saved)} {kind[:-1]}(s), "
                                f"{len(given)} {option} given: give one {option} per "
                                f"{kind[:-1]}, in the snapshot's order "
                                f"({'; '.join(describe_kind(config, kind)) or 'none'})")
        setattr(config, kind, [MERGE[kind](old, new, index)
                               for index, (old, new) in enumerate(zip(saved, given))])
    if unconfirmed:
        named = "; ".join(entry for kind in unconfirmed for entry in describe_kind(config, kind))
        options = ", ".join(f"--{kind[:-1]}" for kind in unconfirmed)
        raise SnapshotError(f"{directory}: the snapshot names host resources ({named}): "
                            f"confirm them with {options} in the same order, or restore "
                            f"with --trust-snapshot if you took the snapshot yourself")
    if config.vsock_uds and not trust:
        # pykvm would make a socket there and connect the guest to PATH_PORT sockets
        raise SnapshotError(f"{directory}: the snapshot names the vsock socket "
                            f"{config.vsock_uds[:120]}: restore with --trust-snapshot if you "
                            f"took the snapshot yourself")


def describe_kind(config, kind: str) -> list[str]:
    prefix = {"disks": "disk", "shares": "share", "nets": "net"}[kind]
    return [entry for entry in describe(config) if entry.startswith(prefix + " ")]


def merge_disk(saved, given, index: int):
    """The override's image; the snapshot's serial; read-only if either says so."""
    if given.serial and given.serial != saved.serial:
        raise SnapshotError(f"--disk {given.path}: serial {given.serial!r}, the guest knows "
                            f"disk {index} as {saved.serial!r}: the serial is the snapshot's")
    return dataclasses.replace(saved, path=given.path,
                               read_only=saved.read_only or given.read_only)


def merge_net(saved, given, index: int):
    """The override's TAP, bridge, address and namespace; the snapshot's MAC (the guest
    has it)."""
    if given.mac is not None and given.mac != saved.mac:
        raise SnapshotError(f"--net: NIC {index}'s MAC is the snapshot's (the guest has it); "
                            f"leave mac= out of the override")
    return dataclasses.replace(given, mac=saved.mac)


def merge_share(saved, given, index: int):
    return str(given)


MERGE = {"disks": merge_disk, "nets": merge_net, "shares": merge_share}
