"""Firecracker's PUT /vsock: a virtio-vsock device with Firecracker's Unix-socket host
side (pykvm/devices/virtio/vsock.py, pykvm/vsock/muxer.py).

Swagger definition Vsock: ``guest_cid`` (at least 3), ``uds_path``, and the deprecated
``vsock_id`` (accepted and ignored, as Firecracker does). Before the start only; a
second PUT replaces the first. As in Firecracker, ``uds_path`` must not exist: the
check here gives the 400 at once, the socket itself is made at InstanceStart (a path
created in between fails the start, with one line). After a snapshot load the device
listens on the snapshot's ``uds_path`` again, and the guest gets a transport reset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...errors import ConfigError
from .resources import ApiFault, Record, spec


@dataclass(frozen=True)
class Vsock(Record):
    guest_cid: int = spec(int)
    uds_path: str = spec(str)
    vsock_id: str | None = spec(str, None)

    def check(self) -> None:
        from ...vsock import VsockSpec
        try:
            VsockSpec(self.guest_cid, self.uds_path)
        except ConfigError as error:
            raise ApiFault(f"Invalid vsock configuration: {error}") from None
        if not self.uds_path:
            raise ApiFault("Invalid vsock configuration: uds_path is empty")


class VsockApi:
    """The vsock resource of one :class:`~.vmm.Vmm`."""

    def __init__(self, vmm):
        self._vmm = vmm
        self.config: Vsock | None = None

    def put(self, body) -> None:
        record = Vsock.from_json(body)
        if os.path.lexists(record.uds_path):
            raise ApiFault(f"Cannot create backend for vsock device: {record.uds_path}: "
                           f"Address in use (remove it first)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(record.uds_path))):
            raise ApiFault(f"Cannot create backend for vsock device: {record.uds_path}: "
                           f"no such directory")
        with self._vmm._lock:
            self._vmm._before_start()
            self.config = record

    def machine_fields(self) -> dict:
        """What InstanceStart puts in the MachineConfig (vsock_cid, vsock_uds)."""
        if self.config is None:
            return {}
        return {"vsock_cid": self.config.guest_cid, "vsock_uds": self.config.uds_path}

    def describe_loaded(self, config) -> None:
        """After a snapshot load: the vsock device the loaded machine has."""
        if config.vsock_cid:
            self.config = Vsock(guest_cid=config.vsock_cid, uds_path=config.vsock_uds)

    def to_json(self) -> dict | None:
        """The "vsock" of GET /vm/config."""
        return self.config.to_json() if self.config is not None else None

    def routes(self) -> dict:
        return {("PUT", "/vsock"): self.put}
