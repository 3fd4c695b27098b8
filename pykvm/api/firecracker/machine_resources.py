"""The microVM's own resources: ``PUT``/``PATCH /machine-config``, ``PUT /boot-source``,
``PUT``/``PATCH /drives/{drive_id}``, ``PUT``/``PATCH /network-interfaces/{iface_id}``
(Firecracker's swagger, ``src/api_server/swagger/firecracker.yaml``; its
``vmm_config/{machine_config,boot_source,drive,net}.rs`` for the checks).

What is checked when: a body is read strictly (record.py); the files it names are
opened or stat'ed at the request, so a wrong path is the request's 400 and not the
start's (as Firecracker's ``BootSourceConfig``/``BlockBuilder`` do); ids must match
the URL's; at most MAX_DRIVES drives and MAX_NICS NICs, one root device, no TAP,
MAC or forwarded host port twice. PUTs are pre-boot only; PATCH of a drive or NIC
is after the start and changes only its rate limiters (rate_limits.py).

Why a module of its own: pykvm/api/firecracker/vmm.py is the microVM's life (its
states, the start, the main thread, snapshots); these are the records it keeps until
InstanceStart turns them into a MachineConfig. :class:`MachineResources` is a mixin
of :class:`~pykvm.api.firecracker.vmm.Vmm` (its ``_lock``, ``_before_start``,
``_after_start`` and the dicts it keeps are the Vmm's).
"""

from __future__ import annotations

import dataclasses
import os
import stat

from . import rate_limits
from .resources import (ApiFault, BootSource, Drive, MachineConfiguration, NetworkInterface,
                        PartialDrive, PartialNetworkInterface, patched, path_id_matches)

MAX_DRIVES = 16
MAX_NICS = 8


class MachineResources:
    """The handlers of the machine's resources (see the module docstring)."""

    def put_machine_config(self, body) -> None:
        record = MachineConfiguration.from_json(body)
        with self._lock:
            self._before_start()
            self.machine_config = record

    def patch_machine_config(self, body) -> None:
        with self._lock:
            self._before_start()
            self.machine_config = patched(self.machine_config, body, "MachineConfiguration")

    def put_boot_source(self, body) -> None:
        record = BootSource.from_json(body)
        _readable(record.kernel_image_path, "The kernel file cannot be opened")
        if record.initrd_path is not None:
            _readable(record.initrd_path, "The initrd file cannot be opened")
        with self._lock:
            self._before_start()
            self.boot_source = record

    def put_drive(self, drive_id: str, body) -> None:
        record = Drive.from_json(body)
        path_id_matches(drive_id, record.drive_id)
        if record.socket is not None:
            _is_socket(record.socket, "Unable to connect to the vhost-user-block socket")
        else:
            _readable(record.path_on_host, "Unable to open the block device backing file")
        with self._lock:
            self._before_start()
            if record.is_root_device and any(d.is_root_device and d.drive_id != drive_id
                                             for d in self.drives.values()):
                raise ApiFault("A root block device already exists!")
            if drive_id not in self.drives and len(self.drives) >= MAX_DRIVES:
                raise ApiFault(f"at most {MAX_DRIVES} drives")
            self.drives[drive_id] = record

    def patch_drive(self, drive_id: str, body) -> None:
        changes = PartialDrive.from_json(body, partial=True)
        path_id_matches(drive_id, changes["drive_id"])
        with self._lock:
            self._after_start()
            if drive_id not in self.drives:
                raise ApiFault(f"Invalid block device ID: {drive_id}")
            if changes.get("path_on_host") is not None:
                raise ApiFault("PATCH /drives path_on_host: swapping a running VM's disk "
                               "image is not supported by pykvm yet")
            if changes.get("rate_limiter") is not None:     # rate_limits.py
                index = [d.drive_id for d in self._ordered_drives()].index(drive_id)
                device = self.machine.virtio.disks[index]
                rate_limits.patch_throttle(rate_limits.block_throttle(device, drive_id),
                                           changes["rate_limiter"])
                old = self.drives[drive_id]
                self.drives[drive_id] = dataclasses.replace(
                    old, rate_limiter=rate_limits.merged(old.rate_limiter,
                                                         changes["rate_limiter"]))

    def put_network_interface(self, iface_id: str, body) -> None:
        from ...net.tap import valid_ifname
        record = NetworkInterface.from_json(body)
        path_id_matches(iface_id, record.iface_id)
        name, net = record.host_dev_name, record.net_spec()
        if net.mode == "tap" and (not valid_ifname(name) or existing_link_kind(name) != "tap"):
            raise ApiFault(f"Could not create the network device: {name[:16]!r} is not an "
                           f"existing TAP device")
        with self._lock:
            self._before_start()
            for other in self.nets.values():
                if other.iface_id == iface_id:
                    continue
                if net.mode == "tap" and other.host_dev_name == name:
                    raise ApiFault(f"The host device name {name} is already in use.")
                taken = {(f.protocol, f.host_port) for f in other.net_spec().forwards}
                for forward in net.forwards:
                    if (forward.protocol, forward.host_port) in taken:
                        raise ApiFault(f"host port {forward.protocol} {forward.host_port} is "
                                       f"already forwarded to {other.iface_id}")
                if record.guest_mac is not None and other.guest_mac == record.guest_mac:
                    raise ApiFault(f"The MAC address is already in use: {record.guest_mac}")
            if iface_id not in self.nets and len(self.nets) >= MAX_NICS:
                raise ApiFault(f"at most {MAX_NICS} network interfaces")
            self.nets[iface_id] = record

    def patch_network_interface(self, iface_id: str, body) -> None:
        changes = PartialNetworkInterface.from_json(body, partial=True)
        path_id_matches(iface_id, changes["iface_id"])
        with self._lock:
            self._after_start()
            if iface_id not in self.nets:
                raise ApiFault(f"Invalid network interface ID: {iface_id}")
            # Only rate limiters can be patched (rate_limits.py).
            device = self.machine.virtio.nets[list(self.nets).index(iface_id)]
            old = self.nets[iface_id]
            updates = {}
            for name, throttle in (("rx_rate_limiter", device.rx_throttle),
                                   ("tx_rate_limiter", device.tx_throttle)):
                if changes.get(name) is not None:
                    rate_limits.patch_throttle(throttle, changes[name])
                    updates[name] = rate_limits.merged(getattr(old, name), changes[name])
            self.nets[iface_id] = dataclasses.replace(old, **updates)


def existing_link_kind(name: str) -> str | None:
    """What kind of link ``name`` is in the calling thread's network namespace (netlink,
    pykvm/net/plumbing.py's reading of it: "tap", "tun", "bridge"...), None if none."""
    from pyroute2 import IPRoute

    from ...net.plumbing import _link, link_kind
    with IPRoute() as ipr:
        link = _link(ipr, name)
    return None if link is None else link_kind(link)


def _is_socket(path: str, what: str) -> None:
    """A vhost-user back end's socket exists now (it is connected at InstanceStart)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ApiFault(f"{what}: {error.strerror} (os error {error.errno})") from None
    if not stat.S_ISSOCK(mode):
        raise ApiFault(f"{what}: {path} is not a Unix socket")


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ApiFault(f"{what}: {error.strerror} (os error {error.errno})") from None
