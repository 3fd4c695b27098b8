"""Firecracker's /balloon, /balloon/statistics, /entropy and SendCtrlAltDel through HTTP
on pykvm-firecracker's socket (pykvm/api/firecracker/balloon.py, entropy.py), in each
state, with Firecracker's status codes and fault messages. The running-state test
starts the default guest's kernel: it needs KVM, not a finished boot (the Linux test
that the guest really uses the devices is tests/linux/test_linux_firecracker_devices.py)."""

from __future__ import annotations

import json
import struct

import pytest

from pykvm.api.firecracker import balloon as fcballoon
from pykvm.api.firecracker.vmm import AFTER_START, BEFORE_START

from .test_firecracker_api import Api, api, firecracker, guest_kernel  # noqa: F401 - fixture
from ..unit.test_firmware_tables import read_table

BALLOON = {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 1}


def test_balloon_before_the_start(api):
    assert api.fault("GET", "/balloon") == fcballoon.NOT_FOUND
    assert api("PUT", "/balloon", BALLOON) == (204, None)
    assert api("GET", "/balloon") == (200, BALLOON)
    assert api("GET", "/vm/config")[1]["balloon"] == BALLOON
    assert api("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}) == (204, None)
    assert api("GET", "/balloon")[1] == {"amount_mib": 0, "deflate_on_oom": False,
                                         "stats_polling_interval_s": 0}
    assert api.fault("PUT", "/balloon", {"amount_mib": 129, "deflate_on_oom": False}) == \
        fcballoon.TOO_LARGE                      # the default machine has 128 MiB
    assert api.fault("PATCH", "/balloon", {"amount_mib": 1}) == BEFORE_START
    assert api.fault("GET", "/balloon/statistics") == BEFORE_START
    assert api.fault("PATCH", "/balloon/statistics",
                     {"stats_polling_interval_s": 1}) == BEFORE_START


@pytest.mark.parametrize("body, message", [
    ({"amount_mib": 1}, "missing field `deflate_on_oom`"),
    ({"amount_mib": -1, "deflate_on_oom": False}, "expected an unsigned integer"),
    ({"amount_mib": 1, "deflate_on_oom": "yes"}, "expected a boolean"),
    ({"amount_mib": 1, "deflate_on_oom": False, "free_page_hinting": True},
     "unknown field `free_page_hinting`"),
    ({"amount_mib": 1, "deflate_on_oom": False, "stats_polling_interval_s": 1 << 40},
     "at most"),
    ([], "expected struct Balloon"),
])
def test_balloon_refuses_bad_bodies(api, body, message):
    assert message in api.fault("PUT", "/balloon", body)
    assert api.fault("GET", "/balloon") == fcballoon.NOT_FOUND     # nothing was kept


def test_entropy_before_the_start(api):
    assert api("GET", "/vm/config")[1]["entropy"] is None
    assert api("PUT", "/entropy", {}) == (204, None)
    assert api("GET", "/vm/config")[1]["entropy"] == {}
    limited = {"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100},
                                "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}}
    assert api("PUT", "/entropy", limited) == (204, None)
    assert api("GET", "/vm/config")[1]["entropy"] == limited
    assert api.vmm.entropy.machine_fields() == {
        "rng": True, "rng_rate_limit": "bandwidth=1000:100:0,ops=10:1000:5"}
    for body, message in [({"rate_limiter": {"bandwidth": {"size": 1}}},
                           "missing field `refill_time`"),
                          ({"rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}},
                           "expected an unsigned integer"),
                          ({"rng": 1}, "unknown field `rng`")]:
        assert message in api.fault("PUT", "/entropy", body)
    assert api("GET", "/vm/config")[1]["entropy"] == limited


def test_config_file_takes_balloon_and_entropy(tmp_path):
    kernel, initrd = guest_kernel()
    config = {"boot-source": {"kernel_image_path": str(kernel)},
              "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
              "balloon": {"amount_mib": 65, "deflate_on_oom": False}, "entropy": {}}
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(config))
    result = firecracker("--no-api", "--config-file", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"error: {fcballoon.TOO_LARGE}"), lines


def test_balloon_entropy_and_ctrl_alt_del_on_a_running_vm(api):
    kernel, initrd = guest_kernel()
    boot = {"kernel_image_path": str(kernel), "boot_args": "quiet"}
    if initrd:
        boot["initrd_path"] = str(initrd)
    assert api("PUT", "/boot-source", boot) == (204, None)
    assert api("PUT", "/balloon", BALLOON) == (204, None)
    assert api("PUT", "/entropy", {"rate_limiter": {
        "bandwidth": {"size": 4096, "refill_time": 1000}}}) == (204, None)
    assert api("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    machine = api.vmm.machine
    assert machine.virtio.rng.rate_limiter.bandwidth.size == 4096
    fadt = read_table(machine.memory, machine.acpi_tables.fadt)[2]
    assert struct.unpack_from("<H", fadt, 109)[0] & 0b10     # the guest is told of the 8042
    assert machine.balloon is not None and machine.balloon.target_pages == 16 << 8
    assert machine.virtio.rng is not None
    for method, url, body in [("PUT", "/balloon", BALLOON), ("PUT", "/entropy", {})]:
        assert api.fault(method, url, body) == AFTER_START
    assert api("PATCH", "/balloon", {"amount_mib": 32}) == (204, None)
    assert machine.balloon.target_pages == 32 << 8
    assert api("GET", "/balloon") == (200, {**BALLOON, "amount_mib": 32})
    assert api.fault("PATCH", "/balloon", {"amount_mib": 129}) == fcballoon.TOO_LARGE
    stats = api("GET", "/balloon/statistics")[1]
    assert stats["target_pages"] == 32 << 8 and stats["target_mib"] == 32
    assert stats["actual_pages"] == 0      # the guest's driver has not run yet
    assert api.fault("PATCH", "/balloon/statistics",
                     {"stats_polling_interval_s": 0}) == fcballoon.STATS_STATE
    assert api("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5}) == (204, None)
    assert api("GET", "/balloon")[1]["stats_polling_interval_s"] == 5
    assert api("GET", "/vm/config")[1]["balloon"]["amount_mib"] == 32
    # The keys reach the keyboard; with the guest paused nothing reads them, and a
    # second chord finds no room in the keyboard's queue (16 bytes, a chord is 11).
    assert api("PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert api("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    assert machine.i8042.save_state().data_full
    assert "CTRL+ALT+DEL" in api.fault("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert api("GET", "/")[1]["state"] == "Paused"      # keys do not stop a VM


def test_no_balloon_on_a_running_vm(api):
    kernel, initrd = guest_kernel()
    assert api("PUT", "/boot-source", {"kernel_image_path": str(kernel)}) == (204, None)
    assert api("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    assert api.vmm.machine.balloon is None
    for method, url, body in [("GET", "/balloon", None), ("PATCH", "/balloon", {"amount_mib": 1}),
                              ("GET", "/balloon/statistics", None),
                              ("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1})]:
        assert api.fault(method, url, body) == fcballoon.NOT_FOUND


def test_statistics_need_an_interval(tmp_path):
    kernel, initrd = guest_kernel()
    server = Api(tmp_path)
    try:
        assert server("PUT", "/boot-source", {"kernel_image_path": str(kernel)}) == (204, None)
        assert server("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False}) == \
            (204, None)
        assert server("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
        assert server.fault("GET", "/balloon/statistics") == fcballoon.STATS_OFF
        assert server.fault("PATCH", "/balloon/statistics",
                            {"stats_polling_interval_s": 1}) == fcballoon.STATS_STATE
    finally:
        server.close()
