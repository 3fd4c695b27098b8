"""Firecracker's MMDS resources: ``PUT /mmds/config`` and ``GET/PUT/PATCH /mmds``
(swagger definitions MmdsConfig and MmdsContentsObject), and ``--metadata FILE``.

/mmds/config is pre-boot only and names NICs already configured; at InstanceStart
each of them gets an :class:`~pykvm.mmds.stack.MmdsStack` as its frame filter, all
answering from one :class:`~pykvm.mmds.store.MetadataStore` and one token authority
(pykvm/mmds/). /mmds works in every state: the guest sees a PUT or PATCH at once.
The data store, its config and the tokens are not part of a pykvm snapshot (a loaded
VM has no MMDS until configured again: Firecracker does not persist the store either).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from ...mmds.guest_http import V1, V2, MmdsService
from ...mmds.stack import DEFAULT_IPV4, MmdsStack
from ...mmds.store import DEFAULT_SIZE_LIMIT, MetadataStore, StoreError
from .record import refuse_unknown_fields
from .resources import DESERIALIZE, MAX_LIST, ApiFault, check_id

EMPTY_LIST = ("The list of network interface IDs that allow forwarding MMDS requests is "
              "empty.")
UNKNOWN_NIC = ("The list of network interface IDs provided contains at least one ID that "
               "does not correspond to any existing network interface.")
NOT_LINK_LOCAL = "The MMDS IPv4 address is not link local."
_FIELDS = ("network_interfaces", "version", "ipv4_address", "imds_compat")


@dataclass(frozen=True)
class MmdsConfig:
    network_interfaces: tuple[str, ...]
    version: str = V1
    ipv4_address: str = DEFAULT_IPV4
    imds_compat: bool = False

    @classmethod
    def from_json(cls, body) -> "MmdsConfig":
        """Strictly, as resources.Record reads a body (its list field holds strings)."""
        if not isinstance(body, dict):
            raise ApiFault(f"{DESERIALIZE}: invalid type, expected struct MmdsConfig")
        refuse_unknown_fields(body, _FIELDS)
        nics = body.get("network_interfaces")
        if nics is None:
            raise ApiFault(f"{DESERIALIZE}: missing field `network_interfaces`")
        if not isinstance(nics, list) or len(nics) > MAX_LIST or \
                not all(isinstance(n, str) for n in nics):
            raise ApiFault(f"{DESERIALIZE}: `network_interfaces` must be a list of at most "
                           f"{MAX_LIST} strings")
        version = body.get("version") or V1
        if version not in (V1, V2):
            raise ApiFault(f"{DESERIALIZE}: unknown variant `{str(version)[:20]}`, expected "
                           f"`V1` or `V2`")
        address = body.get("ipv4_address") or DEFAULT_IPV4
        try:
            parsed = ipaddress.IPv4Address(address)
        except (ValueError, TypeError):
            raise ApiFault(f"{DESERIALIZE}: invalid IPv4 address {str(address)[:40]!r}") \
                from None
        if parsed not in ipaddress.IPv4Network("169.254.0.0/16"):
            raise ApiFault(NOT_LINK_LOCAL)
        compat = body.get("imds_compat", False)
        if not isinstance(compat, bool):
            raise ApiFault(f"{DESERIALIZE}: invalid type, expected a boolean for "
                           f"`imds_compat`")
        if not nics:
            raise ApiFault(EMPTY_LIST)
        for nic in nics:
            check_id(nic, "network interface")
        return cls(tuple(dict.fromkeys(nics)), version, str(parsed), compat)

    def to_json(self) -> dict:
        return {"network_interfaces": list(self.network_interfaces), "version": self.version,
                "ipv4_address": self.ipv4_address, "imds_compat": self.imds_compat}


class MmdsApi:
    """The MMDS of one :class:`~.vmm.Vmm`."""

    def __init__(self, vmm, size_limit: int = DEFAULT_SIZE_LIMIT):
        self._vmm = vmm
        self.store = MetadataStore(size_limit)
        self.config: MmdsConfig | None = None
        self.service: MmdsService | None = None
        self.stacks: dict[str, MmdsStack] = {}

    # --- the API -----------------------------------------------------------------------------
    def put_config(self, body) -> None:
        record = MmdsConfig.from_json(body)
        with self._vmm._lock:
            self._vmm._before_start()
            if any(nic not in self._vmm.nets for nic in record.network_interfaces):
                raise ApiFault(UNKNOWN_NIC)
            self.config = record

    def get(self, body):
        return self.store.get()

    def put(self, body) -> None:
        try:
            self.store.put(body)
        except StoreError as error:
            raise ApiFault(str(error)) from None

    def patch(self, body) -> None:
        try:
            self.store.patch(body)
        except StoreError as error:
            raise ApiFault(str(error)) from None

    def load_file(self, path: str) -> None:
        """``--metadata FILE``: the store's first contents (a JSON object)."""
        from ...control import ControlError, parse_request
        try:
            with open(path, "rb") as stream:
                data = stream.read(self.store.size_limit * 4 + 1)
        except OSError as error:
            raise ApiFault(f"--metadata {path}: cannot read: {error.strerror}") from None
        if len(data) > self.store.size_limit * 4:
            raise ApiFault(f"--metadata {path}: larger than the MMDS size limit")
        try:
            value = parse_request(data)
        except (ControlError, json.JSONDecodeError) as error:
            raise ApiFault(f"--metadata {path}: {error}") from None
        try:
            self.store.put(value)
        except StoreError as error:
            raise ApiFault(f"--metadata {path}: {error}") from None

    # --- the machine -------------------------------------------------------------------------
    def attach(self, nets: list[str], devices) -> None:
        """InstanceStart: the frame filter on each NIC the config names (``nets``: the
        iface ids in the order of ``devices``, the machine's NetDevices)."""
        if self.config is None:
            return
        self.service = MmdsService(self.store, self.config.version,
                                   imds_only=self.config.imds_compat)
        for iface_id in self.config.network_interfaces:
            stack = MmdsStack(self.service, self.config.ipv4_address)
            devices[nets.index(iface_id)].set_frame_filter(stack)
            self.stacks[iface_id] = stack

    def to_json(self) -> dict | None:
        """The "mmds-config" of GET /vm/config."""
        return self.config.to_json() if self.config is not None else None

    def routes(self) -> dict:
        return {("PUT", "/mmds/config"): self.put_config, ("GET", "/mmds"): self.get,
                ("PUT", "/mmds"): self.put, ("PATCH", "/mmds"): self.patch}
