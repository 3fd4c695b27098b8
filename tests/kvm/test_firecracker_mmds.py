"""Firecracker's MMDS resources (api/firecracker/mmds.py): PUT /mmds/config and
GET/PUT/PATCH /mmds in each state with Firecracker's status codes and fault messages,
--metadata, and a NIC whose frames to the MMDS address are answered inside pykvm: an
ARP request sent on the transmit queue comes back on the receive queue and never
reaches the back end."""

from __future__ import annotations

import io
import json
import socket

import pytest

from pykvm.api.firecracker import mmds as fcmmds
from pykvm.api.firecracker.logs import Log
from pykvm.api.firecracker.vmm import AFTER_START, Vmm
from pykvm.devices.virtio.net import NET_HDR_SIZE, NetDevice
from pykvm.memory import GuestMemory
from pykvm.mmds.stack import MMDS_MAC, MmdsStack
from pykvm.net.stream import StreamWire

from .test_firecracker_api import (api, firecracker, user_nic,  # noqa: F401
                                   vmm_with_the_default_guest)
from ..unit.test_mmds import DATA, arp
from .test_passt import needs_passt, user_netns  # noqa: F401 - user_netns: a fixture
from ..unit.test_queue_throttle import ring_and_queue

CONFIG = {"network_interfaces": ["eth0"], "version": "V2"}


@pytest.mark.parametrize("body, message", [
    ({"network_interfaces": []}, fcmmds.EMPTY_LIST),
    ({"network_interfaces": ["eth1"]}, fcmmds.UNKNOWN_NIC),
    ({}, "missing field `network_interfaces`"),
    ({"network_interfaces": "eth0"}, "must be a list"),
    ({"network_interfaces": ["eth0"], "version": "V3"}, "unknown variant `V3`"),
    ({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}, fcmmds.NOT_LINK_LOCAL),
    ({"network_interfaces": ["eth0"], "ipv4_address": "1.2.3"}, "invalid IPv4 address"),
    ({"network_interfaces": ["eth0"], "imds_compat": 1}, "expected a boolean"),
    ({"network_interfaces": ["eth0"], "nope": 1}, "unknown field `nope`"),
    ({"network_interfaces": ["a-b"]}, "Invalid network interface ID"),
])
def test_mmds_config_refuses_bad_bodies(api, body, message):
    assert api("PUT", "/network-interfaces/eth0", user_nic("eth0", "pykvm:user")) == (204, None)
    assert message in api.fault("PUT", "/mmds/config", body)
    assert api("GET", "/vm/config")[1]["mmds-config"] is None


def test_mmds_config_and_data_store_before_the_start(api):
    assert fcmmds.UNKNOWN_NIC in api.fault("PUT", "/mmds/config", CONFIG)   # no NIC yet
    assert api("PUT", "/network-interfaces/eth0", user_nic("eth0", "pykvm:user")) == (204, None)
    assert api("PUT", "/mmds/config", CONFIG) == (204, None)
    assert api("GET", "/vm/config")[1]["mmds-config"] == {
        "network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.169.254",
        "imds_compat": False}
    assert api("GET", "/mmds") == (200, {})
    assert api.fault("PATCH", "/mmds", {"a": 1}) == "The MMDS data store is not initialized."
    assert "must be a JSON object" in api.fault("PUT", "/mmds", [1, 2])
    assert api("PUT", "/mmds", DATA) == (204, None)
    assert api("GET", "/mmds") == (200, DATA)
    assert api("PATCH", "/mmds", {"latest": {"user-data": None}}) == (204, None)
    assert "user-data" not in api("GET", "/mmds")[1]["latest"]
    api.vmm.mmds.store.size_limit = 100
    assert "size limit was exceeded" in api.fault("PUT", "/mmds", {"x": "y" * 100})
    assert "user-data" not in api("GET", "/mmds")[1]["latest"]       # unchanged


def test_metadata_file(tmp_path):
    vmm = Vmm("x", Log("x", stream=io.StringIO()), stdout=io.BytesIO())
    try:
        path = tmp_path / "meta.json"
        path.write_text(json.dumps(DATA))
        vmm.mmds.load_file(str(path))
        assert vmm.mmds.store.get() == DATA
        path.write_text("[1]")
        with pytest.raises(fcmmds.ApiFault, match="must be a JSON object"):
            vmm.mmds.load_file(str(path))
    finally:
        vmm.close()
    done = firecracker("--no-api", "--config-file", str(tmp_path / "none.json"),
                       "--metadata", str(tmp_path / "missing.json"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [      # `pykvm firecracker`: pykvm's prefix
        f"pykvm: error: --metadata {tmp_path / 'missing.json'}: cannot read: "
        f"No such file or directory"]


@needs_passt
def test_instance_start_puts_the_stack_on_the_named_nic(user_netns):
    vmm = vmm_with_the_default_guest()
    try:
        vmm.put_network_interface("eth0", user_nic("eth0", "pykvm:user"))
        vmm.put_network_interface("eth1", user_nic("eth1", "pykvm:user"))
        vmm.mmds.put_config({"network_interfaces": ["eth1"], "ipv4_address": "169.254.1.1"})
        vmm._start()
        first, second = vmm.machine.virtio.nets
        assert first._filter is None and isinstance(second._filter, MmdsStack)
        assert second._filter.ip == bytes([169, 254, 1, 1])
        with pytest.raises(fcmmds.ApiFault, match=AFTER_START):
            vmm.mmds.put_config({"network_interfaces": ["eth0"]})
        vmm.mmds.put(DATA)                          # the data store works in every state
        assert vmm.mmds.store.lookup("/latest/user-data") == "hello"
    finally:
        vmm.close()


def test_nic_answers_arp_for_mmds_into_its_receive_queue():
    host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = NetDevice(StreamWire(guest_end.detach()), b"\x52\x54\x00\x12\x34\x5f",
                       name="net-m")
    kicks = []
    device.kick = kicks.append
    with GuestMemory.anonymous(2 << 20) as memory:
        tx_ring, tx_queue = ring_and_queue(memory, 0x1000)
        rx_ring, rx_queue = ring_and_queue(memory, 0x4000)
        try:
            from pykvm.mmds.guest_http import MmdsService
            from pykvm.mmds.store import MetadataStore
            device.set_frame_filter(MmdsStack(MmdsService(MetadataStore())))
            request = arp()
            memory.write(0x20000, bytes(NET_HDR_SIZE) + request)
            tx_ring.add_chain([(0x20000, NET_HDR_SIZE + len(request), False)])
            rx_ring.add_chain([(0x30000, 2048, True)])
            device.process_queue(1, tx_queue)
            assert tx_ring.take_used() == [(0, 0)] and 0 in kicks   # RX kicked
            device.process_queue(0, rx_queue)
            (head, length), = rx_ring.take_used()
            reply = memory.read(0x30000 + NET_HDR_SIZE, length - NET_HDR_SIZE)
            assert reply[6:12] == MMDS_MAC and reply[12:14] == b"\x08\x06"
            assert device.stats["tx_intercepted"] == 1 and device.stats["tx_frames"] == 0
            host.setblocking(False)
            with pytest.raises(BlockingIOError):
                host.recv(100)                         # nothing reached the back end
        finally:
            device.close()
            host.close()


def test_config_file_takes_mmds_config_after_the_nics(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(kernel)},
        "mmds-config": {"network_interfaces": ["eth0"], "version": "V2"},
        "network-interfaces": [user_nic("eth0", "pykvm:user")]}))
    vmm = Vmm("x", Log("x", stream=io.StringIO()), stdout=io.BytesIO())
    try:
        vmm.apply_config_file(str(path))
        assert vmm.vm_config()["mmds-config"]["version"] == "V2"
    finally:
        vmm.close()
