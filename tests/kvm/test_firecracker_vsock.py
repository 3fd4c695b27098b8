"""Firecracker's PUT /vsock through HTTP on pykvm-firecracker's socket
(pykvm/api/firecracker/vsock.py): bodies, states, GET /vm/config, --config-file, and
InstanceStart making the device listen on uds_path. The running-state test starts
the default guest's kernel: it needs KVM, not a finished boot (the guest using the
device is tests/linux/test_linux_vsock.py)."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from pykvm.api.firecracker.vmm import AFTER_START

from .test_firecracker_api import Api, api, firecracker, guest_kernel  # noqa: F401 - fixture


def test_vsock_before_the_start(api, tmp_path):
    uds = str(tmp_path / "v.sock")
    assert api("GET", "/vm/config")[1]["vsock"] is None
    assert api("PUT", "/vsock", {"guest_cid": 3, "uds_path": uds}) == (204, None)
    assert api("GET", "/vm/config")[1]["vsock"] == {"guest_cid": 3, "uds_path": uds}
    assert api("PUT", "/vsock", {"guest_cid": 7, "uds_path": uds, "vsock_id": "vsock0"}) == \
        (204, None)                               # a second PUT replaces the first
    assert api.vmm.vsock.machine_fields() == {"vsock_cid": 7, "vsock_uds": uds}
    assert not os.path.lexists(uds)               # made at InstanceStart


@pytest.mark.parametrize("body, message", [
    ({"guest_cid": 3}, "missing field `uds_path`"),
    ({"uds_path": "/tmp/x"}, "missing field `guest_cid`"),
    ({"guest_cid": 2, "uds_path": "/tmp/x"}, "must be 3 to"),
    ({"guest_cid": 1 << 32, "uds_path": "/tmp/x"}, "must be 3 to"),
    ({"guest_cid": -3, "uds_path": "/tmp/x"}, "expected an unsigned integer"),
    ({"guest_cid": "3", "uds_path": "/tmp/x"}, "expected an unsigned integer"),
    ({"guest_cid": 3, "uds_path": ""}, "uds_path is empty"),
    ({"guest_cid": 3, "uds_path": "/" + "a" * 200}, "at most"),
    ({"guest_cid": 3, "uds_path": "/nonexistent-dir/v.sock"}, "no such directory"),
    ({"guest_cid": 3, "uds_path": "/tmp/x", "cid": 3}, "unknown field `cid`"),
])
def test_vsock_refuses_bad_bodies(api, body, message):
    assert message in api.fault("PUT", "/vsock", body)
    assert api("GET", "/vm/config")[1]["vsock"] is None        # nothing was kept


def test_an_existing_uds_path_is_refused(api, tmp_path):
    taken = tmp_path / "taken"
    taken.symlink_to(tmp_path / "nowhere")
    assert "Address in use" in api.fault("PUT", "/vsock", {"guest_cid": 3,
                                                           "uds_path": str(taken)})
    assert not os.path.lexists(tmp_path / "nowhere")


def test_instance_start_listens_on_uds_path(api, tmp_path):
    kernel, initrd = guest_kernel()
    uds = tmp_path / "v.sock"
    assert api("PUT", "/boot-source", {"kernel_image_path": str(kernel),
                                       "boot_args": "quiet"}) == (204, None)
    assert api("PUT", "/vsock", {"guest_cid": 5, "uds_path": str(uds)}) == (204, None)
    assert api("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    machine = api.vmm.machine
    assert machine.vsock is not None and machine.vsock.guest_cid == 5
    assert machine.vsock.read_config(0, 8) == 5
    assert stat.S_ISSOCK(os.lstat(uds).st_mode) and os.lstat(uds).st_mode & 0o777 == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(uds))                 # the muxer takes clients at once
    assert api.fault("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "w")}) == \
        AFTER_START
    assert api("GET", "/vm/config")[1]["vsock"] == {"guest_cid": 5, "uds_path": str(uds)}


def test_config_file_takes_vsock(tmp_path):
    kernel, initrd = guest_kernel()
    config = {"boot-source": {"kernel_image_path": str(kernel)},
              "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
              "vsock": {"guest_cid": 1, "uds_path": str(tmp_path / "v.sock")}}
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(config))
    result = firecracker("--no-api", "--config-file", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vsock guest CID 1: must be 3" in lines[0], lines


def test_a_configured_vsock_forbids_a_snapshot_load(api, tmp_path):
    assert api("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}) == \
        (204, None)
    assert "Loading a microVM snapshot not allowed" in api.fault(
        "PUT", "/snapshot/load", {"snapshot_path": str(tmp_path / "s"),
                                  "mem_file_path": str(tmp_path / "m")})
