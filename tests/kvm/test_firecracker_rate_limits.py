"""Firecracker's rate limiters on drives and network interfaces (api/firecracker/
rate_limits.py): accepted and shown before the start, given to pykvm's virtio-blk and
virtio-net at InstanceStart, updated by PATCH on a running VM with Firecracker's
meaning (a bucket given replaces, one left out is kept, size 0 turns it off)."""

from __future__ import annotations

from pykvm.api.firecracker.vmm import BEFORE_START

from .test_firecracker_api import (api, user_nic,  # noqa: F401 - api: a fixture
                                   vmm_with_the_default_guest)
from .test_passt import needs_passt, user_netns  # noqa: F401 - user_netns: a fixture

LIMITED = {"bandwidth": {"size": 1 << 20, "refill_time": 1000},
           "ops": {"size": 100, "one_time_burst": 50, "refill_time": 1000}}


def test_drive_and_nic_limiters_before_the_start(api, tmp_path):
    image = tmp_path / "data.img"
    image.write_bytes(bytes(65536))
    drive = {"drive_id": "data", "path_on_host": str(image), "is_root_device": False,
             "rate_limiter": LIMITED}
    assert api("PUT", "/drives/data", drive) == (204, None)
    assert api("GET", "/vm/config")[1]["drives"][0]["rate_limiter"] == LIMITED
    for limiter, message in [({"bandwidth": {}}, "missing field `size`"),
                             ({"bandwidth": {"size": 1, "refill_time": -1}},
                              "expected an unsigned integer"),
                             ({"bytes": {}}, "unknown field `bytes`"),
                             ([], "expected struct")]:
        assert message in api.fault("PUT", "/drives/data", {**drive, "rate_limiter": limiter})
        assert message in api.fault("PUT", "/network-interfaces/eth0", user_nic(
            "eth0", "pykvm:user", tx_rate_limiter=limiter))
    assert api.fault("PATCH", "/drives/data", {"drive_id": "data",
                                               "rate_limiter": LIMITED}) == BEFORE_START
    assert api("GET", "/vm/config")[1]["drives"][0]["rate_limiter"] == LIMITED


@needs_passt
def test_limiters_reach_the_devices_and_patch_updates_them(user_netns, tmp_path):
    """The machine is built as InstanceStart builds it but never run."""
    image = tmp_path / "data.img"
    image.write_bytes(bytes(65536))
    vmm = vmm_with_the_default_guest()
    try:
        vmm.put_drive("data", {"drive_id": "data", "path_on_host": str(image),
                               "is_root_device": False, "rate_limiter": LIMITED})
        vmm.put_network_interface("eth0", user_nic(
            "eth0", "pykvm:user", tx_rate_limiter={"ops": {"size": 10, "refill_time": 100}}))
        vmm._start()
        disk, = vmm.machine.virtio.disks
        nic, = vmm.machine.virtio.nets
        limiter = disk.throttle.limiter
        assert (limiter.bandwidth.size, limiter.ops.size, limiter.ops.one_time_burst) == \
            (1 << 20, 100, 50)
        assert nic.rx_throttle.limiter is None and nic.tx_throttle.limiter.ops.size == 10

        vmm.patch_drive("data", {"drive_id": "data",
                                 "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}})
        assert disk.throttle.limiter.ops is None                   # turned off
        assert disk.throttle.limiter.bandwidth is limiter.bandwidth   # kept, tokens and all
        vmm.patch_network_interface("eth0", {"iface_id": "eth0", "rx_rate_limiter": {
            "bandwidth": {"size": 5000, "refill_time": 10}}})
        assert nic.rx_throttle.limiter.bandwidth.size == 5000
        assert nic.tx_throttle.limiter.ops.size == 10
        shown = vmm.vm_config()
        assert shown["drives"][0]["rate_limiter"]["ops"] == {"size": 0, "refill_time": 0}
        assert shown["network-interfaces"][0]["rx_rate_limiter"] == {
            "bandwidth": {"size": 5000, "refill_time": 10}}
    finally:
        vmm.close()
