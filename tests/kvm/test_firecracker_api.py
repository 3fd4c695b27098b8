"""Firecracker's API (pykvm/api/firecracker) through HTTP on its Unix socket: every
resource in each state, status codes and fault messages, bounds, the command line.
The running-state tests start the default guest's kernel and pause it at once: they
need KVM, not a finished boot."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from pykvm.api.firecracker import http as fchttp
from pykvm.api.firecracker.logs import Log
from pykvm.api.firecracker.resources import ApiFault, Drive, MachineConfiguration
from pykvm.api.firecracker.vmm import AFTER_START, BEFORE_START, Vmm
from pykvm.vstate.vm import install_kick_handler

from .test_net import netns  # noqa: F401 - the fixture: a throwaway network namespace
from .test_passt import needs_passt, user_netns  # noqa: F401 - user_netns: one with an uplink


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: what Firecracker's Python clients do."""

    def __init__(self, path: str, timeout: float = 60.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(path: str, method: str, url: str, body=None, raw: bytes | None = None):
    """(status, parsed JSON or None) of one request on a new connection."""
    connection = UnixHTTPConnection(path)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, url, body=data, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None
    finally:
        connection.close()


def fault(path, method, url, body=None, **kwargs) -> str:
    status, answer = call(path, method, url, body, **kwargs)
    assert status == 400, (status, answer)
    return answer["fault_message"]


class Api:
    """A Vmm and its ApiServer in this process; serve_main on a thread of its own."""

    def __init__(self, tmp_path, name="fc.sock"):
        install_kick_handler()    # the process's main thread does it in pykvm-firecracker
        self.sock = str(tmp_path / name)
        self.stderr = io.StringIO()
        self.vmm = Vmm("test-vm", Log("test-vm", "Debug", stream=self.stderr),
                       stdout=io.BytesIO())
        self.server = fchttp.ApiServer(self.sock, self.vmm)
        self.stop = None
        self.main = threading.Thread(target=self._main, daemon=True)
        self.main.start()

    def _main(self):
        self.stop = self.vmm.serve_main()

    def __call__(self, method, url, body=None, **kwargs):
        return call(self.sock, method, url, body, **kwargs)

    def fault(self, method, url, body=None, **kwargs):
        return fault(self.sock, method, url, body, **kwargs)

    def close(self):
        self.vmm.end()
        self.main.join(timeout=30)
        self.server.close()
        self.vmm.close()


@pytest.fixture
def api(tmp_path):
    server = Api(tmp_path)
    yield server
    server.close()


def guest_kernel():
    from pykvm.errors import ConfigError
    from pykvm.machine import default_linux_guest
    try:
        return default_linux_guest()
    except ConfigError as error:
        pytest.skip(str(error))


def vmm_with_the_default_guest() -> Vmm:
    """A Vmm (its log in a buffer, the guest's output dropped) whose boot source is the
    default guest, not started: the caller adds devices, may call ``_start()`` (which
    builds the machine as InstanceStart does) and closes it."""
    kernel, initrd = guest_kernel()
    vmm = Vmm("x", Log("x", stream=io.StringIO()), stdout=io.BytesIO())
    try:
        boot = {"kernel_image_path": str(kernel)}
        if initrd:
            boot["initrd_path"] = str(initrd)
        vmm.put_boot_source(boot)
    except BaseException:
        vmm.close()
        raise
    return vmm


# --- before the start -------------------------------------------------------------------------------
def test_instance_info_and_version(api):
    status, info = api("GET", "/")
    assert status == 200
    assert info == {"app_name": "Firecracker", "id": "test-vm", "state": "Not started",
                    "vmm_version": "1.7.0"}
    assert api("GET", "/version") == (200, {"firecracker_version": "1.7.0"})


def test_machine_config_put_get_patch(api):
    assert api("GET", "/machine-config") == (200, {
        "vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
        "huge_pages": "None"})
    assert api("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}) == (204, None)
    assert api("PATCH", "/machine-config", {"mem_size_mib": 512}) == (204, None)
    status, config = api("GET", "/machine-config")
    assert (config["vcpu_count"], config["mem_size_mib"]) == (2, 512)


@pytest.mark.parametrize("body, message", [
    ({"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}, "unknown field `bogus`"),
    ({"vcpu_count": "1", "mem_size_mib": 128}, "invalid type: string '1'"),
    ({"vcpu_count": True, "mem_size_mib": 128}, "invalid type: boolean `true`"),
    ({"vcpu_count": -1, "mem_size_mib": 128}, "invalid type: number -1"),
    ({"mem_size_mib": 128}, "missing field `vcpu_count`"),
    ({"vcpu_count": 0, "mem_size_mib": 128}, "The vCPU number is invalid"),
    ({"vcpu_count": 1, "mem_size_mib": 128, "smt": True}, "SMT"),
    ({"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"}, "unknown variant `1G`"),
    ([1, 2], "expected struct"),
])
def test_machine_config_refuses_bad_bodies(api, body, message):
    assert message in api.fault("PUT", "/machine-config", body)
    assert api("GET", "/machine-config")[1]["vcpu_count"] == 1      # unchanged


def test_patch_machine_config_checks_the_result(api):
    assert "The vCPU number is invalid" in api.fault("PATCH", "/machine-config",
                                                     {"vcpu_count": 99})
    assert "unknown field" in api.fault("PATCH", "/machine-config", {"vcpus": 2})


def test_boot_source(api, tmp_path):
    missing = str(tmp_path / "no-kernel")
    assert "The kernel file cannot be opened" in api.fault(
        "PUT", "/boot-source", {"kernel_image_path": missing})
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0" * 4096)
    assert "missing field `kernel_image_path`" in api.fault("PUT", "/boot-source",
                                                            {"boot_args": "x"})
    assert api("PUT", "/boot-source", {"kernel_image_path": str(kernel),
                                       "boot_args": "console=ttyS0"}) == (204, None)
    assert api("GET", "/vm/config")[1]["boot-source"] == {
        "kernel_image_path": str(kernel), "boot_args": "console=ttyS0"}
    # Not a kernel: InstanceStart fails with one line, and the VM can still be configured.
    assert "Start microvm error" in api.fault("PUT", "/actions", {"action_type": "InstanceStart"})
    assert api("GET", "/")[1]["state"] == "Not started"
    assert api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}) == (204, None)


def test_drives(api, tmp_path):
    image = tmp_path / "root.ext4"
    image.write_bytes(b"\0" * 65536)
    other = tmp_path / "data.img"
    other.write_bytes(b"\0" * 65536)
    root = {"drive_id": "rootfs", "path_on_host": str(image), "is_root_device": True,
            "is_read_only": False}
    assert "does not match the id from the body" in api.fault("PUT", "/drives/other", root)
    assert "Unable to open the block device backing file" in api.fault(
        "PUT", "/drives/rootfs", {**root, "path_on_host": str(tmp_path / "none")})
    assert "missing field `is_root_device`" in api.fault(
        "PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(image)})
    assert "missing field `size`" in api.fault(     # test_firecracker_rate_limits.py
        "PUT", "/drives/rootfs", {**root, "rate_limiter": {"bandwidth": {}}})
    assert "Invalid drive ID" in api.fault("PUT", "/drives/a-b", {**root, "drive_id": "a-b"})
    assert api("PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(other),
                                       "is_root_device": False, "is_read_only": True}) == (204, None)
    assert api("PUT", "/drives/rootfs", root) == (204, None)
    assert api("PUT", "/drives/rootfs", root) == (204, None)      # a PUT replaces
    assert "A root block device already exists" in api.fault(
        "PUT", "/drives/second", {**root, "drive_id": "second"})
    drives = api("GET", "/vm/config")[1]["drives"]
    assert [d["drive_id"] for d in drives] == ["rootfs", "data"]        # root first: vda
    config = api.vmm.machine_config_for_start if api.vmm.boot_source else None
    assert config is None                # no boot source yet: InstanceStart would refuse
    assert "Cannot start microvm without kernel configuration" in api.fault(
        "PUT", "/actions", {"action_type": "InstanceStart"})
    assert "not supported before starting" in api.fault(
        "PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(image)})


def test_root_device_goes_on_the_command_line(tmp_path):
    vmm = Vmm("x", Log("x", stream=io.StringIO()))
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    image = tmp_path / "r"
    image.write_bytes(b"\0" * 512)
    vmm.put_boot_source({"kernel_image_path": str(kernel), "boot_args": "pci=off quiet"})
    vmm.put_drive("rootfs", {"drive_id": "rootfs", "path_on_host": str(image),
                             "is_root_device": True, "is_read_only": True})
    config = vmm.machine_config_for_start()
    # pci=off stays: the disks are virtio-mmio devices, announced on the command line
    assert config.append == ("pci=off quiet i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd "
                             "root=/dev/vda ro") and config.transport == "mmio"
    assert [(d.path, d.read_only, d.serial) for d in config.disks] == [(str(image), True,
                                                                       "rootfs")]
    vmm.put_drive("rootfs", {"drive_id": "rootfs", "path_on_host": str(image),
                             "is_root_device": True, "partuuid": "0eaa91a0-01"})
    assert vmm.machine_config_for_start().append.endswith("root=PARTUUID=0eaa91a0-01 rw")


def test_i8042_probe_words_are_added_unless_the_user_set_them(tmp_path):
    """Firecracker's recommended i8042 words (its docs, SendCtrlAltDel) join the command
    line; one the user's boot_args set, in either spelling, is left as the user wrote it."""
    vmm = Vmm("x", Log("x", stream=io.StringIO()))
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    vmm.put_boot_source({"kernel_image_path": str(kernel),
                         "boot_args": "console=ttyS0 i8042.nomux=0 i8042.dumbkbd"})
    words = vmm.machine_config_for_start().append.split()
    assert words == ["console=ttyS0", "i8042.nomux=0", "i8042.dumbkbd", "i8042.noaux",
                     "i8042.nopnp"]


def test_network_interface_needs_an_existing_tap(api):
    body = {"iface_id": "eth0", "host_dev_name": "nosuchtap0", "guest_mac": "06:00:AC:10:00:02"}
    assert "not an existing TAP device" in api.fault("PUT", "/network-interfaces/eth0", body)
    assert "not an existing TAP device" in api.fault(
        "PUT", "/network-interfaces/eth0", {**body, "host_dev_name": "lo"})
    assert "invalid MAC address" in api.fault(
        "PUT", "/network-interfaces/eth0", {**body, "guest_mac": "06:00"})
    assert "missing field `host_dev_name`" in api.fault(
        "PUT", "/network-interfaces/eth0", {"iface_id": "eth0"})
    assert "not supported before starting" in api.fault(
        "PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"})


def test_network_interface_on_an_existing_tap(netns, tmp_path):
    """Called on the Vmm directly: the check runs in the calling thread's namespace."""
    from .test_net import ip
    ip("tuntap", "add", "dev", "fctap0", "mode", "tap")
    ip("tuntap", "add", "dev", "fctap1", "mode", "tap")
    ip("tuntap", "add", "dev", "fctun0", "mode", "tun")
    vmm = Vmm("x", Log("x", stream=io.StringIO()))
    body = {"iface_id": "eth0", "host_dev_name": "fctap0", "guest_mac": "06:00:ac:10:00:02"}
    vmm.put_network_interface("eth0", body)
    with pytest.raises(ApiFault, match="not an existing TAP device"):
        vmm.put_network_interface("eth1", {**body, "iface_id": "eth1", "host_dev_name": "fctun0"})
    with pytest.raises(ApiFault, match="host device name fctap0 is already in use"):
        vmm.put_network_interface("eth1", {**body, "iface_id": "eth1"})
    with pytest.raises(ApiFault, match="MAC address is already in use"):
        vmm.put_network_interface("eth1", {**body, "iface_id": "eth1", "host_dev_name": "fctap1"})
    with pytest.raises(ApiFault, match="multicast"):
        vmm.put_network_interface("eth1", {"iface_id": "eth1", "host_dev_name": "fctap1",
                                           "guest_mac": "01:00:5e:00:00:01"})
    vmm.put_network_interface("eth1", {"iface_id": "eth1", "host_dev_name": "fctap1"})
    assert [n["host_dev_name"] for n in vmm.vm_config()["network-interfaces"]] == ["fctap0",
                                                                                  "fctap1"]
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    vmm.put_boot_source({"kernel_image_path": str(kernel)})
    nets = vmm.machine_config_for_start().nets
    assert [(n.tap, n.mac) for n in nets] == [("fctap0", bytes.fromhex("0600ac100002")),
                                              ("fctap1", None)]


def test_actions_and_post_boot_only_requests_before_the_start(api):
    assert "unknown variant `Reboot`" in api.fault("PUT", "/actions", {"action_type": "Reboot"})
    assert "metrics system is not initialized" in api.fault(
        "PUT", "/actions", {"action_type": "FlushMetrics"})
    assert api.fault("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == BEFORE_START
    assert api.fault("PATCH", "/vm", {"state": "Paused"}) == BEFORE_START
    assert "unknown variant `Stopped`" in api.fault("PATCH", "/vm", {"state": "Stopped"})
    assert api.fault("PUT", "/snapshot/create", {"snapshot_path": "/tmp/s",
                                                 "mem_file_path": "/tmp/m"}) == BEFORE_START


def test_metrics_and_logger(api, tmp_path):
    metrics, log = tmp_path / "metrics", tmp_path / "log"
    assert "no such file or named pipe" in api.fault("PUT", "/metrics",
                                                     {"metrics_path": str(metrics)})
    os.mkfifo(log)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)
    metrics.touch()
    os.symlink(metrics, tmp_path / "link")
    assert "cannot open" in api.fault("PUT", "/metrics", {"metrics_path": str(tmp_path / "link")})
    assert api("PUT", "/metrics", {"metrics_path": str(metrics)}) == (204, None)
    assert "Reinitialization of metrics not allowed" in api.fault(
        "PUT", "/metrics", {"metrics_path": str(metrics)})
    assert api("PUT", "/actions", {"action_type": "FlushMetrics"}) == (204, None)
    line = json.loads(metrics.read_text().splitlines()[0])
    assert line["vmm"] == {"state": "Not started"} and line["utc_timestamp_ms"] > 0
    assert "unknown variant `Loud`" in api.fault("PUT", "/logger", {"level": "Loud"})
    assert api("PUT", "/logger", {"log_path": str(log), "level": "Info",
                                  "show_level": True}) == (204, None)
    api.vmm.log.info("hello from the test")
    text = os.read(reader, 4096).decode()
    os.close(reader)
    assert re.search(r"^\d{4}-\d\d-\d\dT[\d:.]+ \[test-vm:[^:\]]+:INFO\] hello from the test$",
                     text, re.M), text
    assert api("GET", "/vm/config")[1]["metrics"] == {"metrics_path": str(metrics)}


def test_metrics_are_written_unasked(api, tmp_path, monkeypatch):
    from pykvm.api.firecracker import vmm as vmm_module
    monkeypatch.setattr(vmm_module, "METRICS_INTERVAL", 0.2)
    metrics = tmp_path / "metrics"
    metrics.touch()
    assert api("PUT", "/metrics", {"metrics_path": str(metrics)}) == (204, None)
    deadline = time.monotonic() + 30
    while len(metrics.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline, "no periodic metrics line"
        time.sleep(0.1)
    assert all(json.loads(line)["vmm"]["state"] == "Not started"
               for line in metrics.read_text().splitlines())


def test_bad_requests(api):
    assert "Invalid request method and/or path: GET /nope" in api.fault("GET", "/nope")
    assert "Invalid request method and/or path: DELETE /" in api.fault("DELETE", "/")
    assert "not supported by pykvm yet" in api.fault("PUT", "/cpu-config", {})
    assert "missing field `guest_cid`" in api.fault("PUT", "/vsock", {})
    assert "The request body is missing" in api.fault("PUT", "/machine-config")
    assert "not a JSON request" in api.fault("PUT", "/machine-config", raw=b"{nope")
    assert "not a JSON request" in api.fault("PUT", "/machine-config", raw=b"[" * 100 + b"]" * 100)
    status, answer = api("PUT", "/machine-config", raw=b" " * (fchttp.MAX_BODY + 1))
    assert status == 413 and "larger than the limit" in answer["fault_message"]
    assert api("GET", "/")[0] == 200            # the server still serves


def test_connections_are_bounded(api):
    held = []
    for _ in range(fchttp.MAX_CONNECTIONS):
        connection = UnixHTTPConnection(api.sock)
        connection.request("GET", "/")
        assert connection.getresponse().read()
        held.append(connection)                 # kept alive: each holds a slot
    try:
        # Refused at accept, before a byte is read: the answer comes unasked.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(30)
            extra.connect(api.sock)
            answer = extra.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 400") and "too many connections" in answer
    finally:
        for connection in held:
            connection.close()
    deadline = time.monotonic() + 10
    while api("GET", "/")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_other_users_are_refused(tmp_path_factory):
    import pathlib
    import shutil
    import tempfile
    directory = pathlib.Path(tempfile.mkdtemp(prefix="pykvm-fc-"))
    os.chmod(directory, 0o711)           # other users may reach the socket file...
    api = Api(directory)
    os.chmod(api.sock, 0o666)            # ...even one left open by mistake
    try:
        _connect_as_nobody(api)
    finally:
        api.close()
        shutil.rmtree(directory)


def _connect_as_nobody(api):
    """A forked child as uid 65534 connects (the interpreter's path may not be readable
    by that user, so no new process is started)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:            # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(20)
                sock.connect(api.sock)
                os.write(write_end, sock.recv(4096))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        out = stream.read().decode()
    os.waitpid(pid, 0)
    assert out.startswith("HTTP/1.1 400") and "uid 65534 may not use this socket" in out


def test_strict_records_directly():
    with pytest.raises(ApiFault, match="unknown field `x`"):
        Drive.from_json({"drive_id": "a", "is_root_device": False, "path_on_host": "/", "x": 1})
    assert MachineConfiguration.from_json({"vcpu_count": 2, "mem_size_mib": 64}).vcpu_count == 2


# --- running, paused, snapshotted, loaded (real KVM; the guest need not finish booting) ------------
def test_running_paused_snapshot_and_load(api, tmp_path):
    kernel, initrd = guest_kernel()
    boot = {"kernel_image_path": str(kernel), "boot_args": "quiet"}
    if initrd:
        boot["initrd_path"] = str(initrd)
    assert api("PUT", "/boot-source", boot) == (204, None)
    assert api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}) == (204, None)
    image = tmp_path / "data.img"
    image.write_bytes(b"\0" * 65536)
    assert api("PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(image),
                                       "is_root_device": False}) == (204, None)
    assert api("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    assert api("GET", "/")[1]["state"] == "Running"
    assert api("PATCH", "/drives/data", {"drive_id": "data"}) == (204, None)
    assert "not supported by pykvm yet" in api.fault(
        "PATCH", "/drives/data", {"drive_id": "data", "path_on_host": str(image)})
    assert "Invalid block device ID" in api.fault("PATCH", "/drives/nope", {"drive_id": "nope"})
    for method, url, body in [("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                              ("PUT", "/boot-source", boot),
                              ("PUT", "/actions", {"action_type": "InstanceStart"}),
                              ("PUT", "/snapshot/load", {"snapshot_path": "/x",
                                                         "mem_file_path": "/y"})]:
        assert api.fault(method, url, body) == AFTER_START
    assert api("GET", "/vm/config")[1]["machine-config"]["mem_size_mib"] == 128
    snapshot, memory = tmp_path / "vm.snap", tmp_path / "vm.mem"
    paths = {"snapshot_path": str(snapshot), "mem_file_path": str(memory)}
    assert "must be paused" in api.fault("PUT", "/snapshot/create", paths)
    assert api("PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert api("GET", "/")[1]["state"] == "Paused"
    assert "Diff" in api.fault("PUT", "/snapshot/create", {**paths, "snapshot_type": "Diff"})
    assert api("PUT", "/snapshot/create", paths) == (204, None)
    assert snapshot.is_file() and memory.stat().st_size == 128 << 20
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pykvm")] == []
    assert api("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    assert api("GET", "/")[1]["state"] == "Running"
    # SendCtrlAltDel presses keys (tests/kvm/test_firecracker_devices.py); it does not stop the
    # VM itself: the guest's reboot would, and this guest has not booted that far.
    assert api("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    api.vmm.end()
    api.main.join(timeout=30)
    assert api.stop is not None
    api.vmm.machine.close()         # its process would have ended: the disk's lock goes

    fresh = Api(tmp_path, "fresh.sock")
    try:
        assert "exactly one of mem_file_path and mem_backend" in fresh.fault(
            "PUT", "/snapshot/load", {"snapshot_path": str(snapshot)})
        assert "Load snapshot error" in fresh.fault(
            "PUT", "/snapshot/load", {"snapshot_path": str(memory),
                                      "mem_file_path": str(memory)})
        assert fresh("GET", "/")[1]["state"] == "Not started"
        assert fresh("PUT", "/snapshot/load", {
            "snapshot_path": str(snapshot),
            "mem_backend": {"backend_type": "File", "backend_path": str(memory)}}) == (204, None)
        assert fresh("GET", "/")[1]["state"] == "Paused"
        assert fresh("GET", "/machine-config")[1]["mem_size_mib"] == 128
        loaded = fresh("GET", "/vm/config")[1]
        assert loaded["boot-source"]["kernel_image_path"] == str(kernel)
        assert loaded["drives"] == [{"drive_id": "data", "path_on_host": str(image),
                                     "is_root_device": False, "is_read_only": False,
                                     "cache_type": "Unsafe", "io_engine": "Sync"}]
        assert fresh("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
        assert fresh("GET", "/")[1]["state"] == "Running"
    finally:
        fresh.close()


def test_snapshot_load_network_overrides(netns, tmp_path):
    """PUT /snapshot/load's network_overrides (Firecracker >= 1.12) re-point a NIC, named
    by its iface_id, at another TAP: the snapshot's TAP is gone before the load, the NIC
    comes up on the new one with the snapshot's MAC (a snapshot keeps a guest_mac); an
    iface_id the snapshot has no NIC of is Firecracker's 400. The Api threads start inside the test's namespace."""
    from .test_net import ip
    kernel, initrd = guest_kernel()
    ip("tuntap", "add", "dev", "fctap0", "mode", "tap")
    ip("tuntap", "add", "dev", "fctap1", "mode", "tap")
    api = Api(tmp_path)
    try:
        boot = {"kernel_image_path": str(kernel), "boot_args": "quiet"}
        if initrd:
            boot["initrd_path"] = str(initrd)
        assert api("PUT", "/boot-source", boot) == (204, None)
        assert api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}) == (204, None)
        assert api("PUT", "/network-interfaces/eth0", {
            "iface_id": "eth0", "host_dev_name": "fctap0",
            "guest_mac": "06:00:ac:10:00:02"}) == (204, None)
        assert api("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
        assert api("PATCH", "/vm", {"state": "Paused"}) == (204, None)
        paths = {"snapshot_path": str(tmp_path / "vm.snap"),
                 "mem_file_path": str(tmp_path / "vm.mem")}
        answer = api("PUT", "/snapshot/create", paths)
        assert answer == (204, None), answer
        api.vmm.end()
        api.main.join(timeout=30)
        api.vmm.machine.close()
    finally:
        api.close()
    ip("link", "del", "fctap0")            # the snapshot's TAP: the load must not need it

    fresh = Api(tmp_path, "fresh.sock")
    try:
        message = fresh.fault("PUT", "/snapshot/load", {**paths, "network_overrides": [
            {"iface_id": "eth9", "host_dev_name": "fctap1"}]})
        assert "Load snapshot error" in message and "'eth9'" in message
        assert fresh("GET", "/")[1]["state"] == "Not started"
        assert fresh("PUT", "/snapshot/load", {**paths, "network_overrides": [
            {"iface_id": "eth0", "host_dev_name": "fctap1"}]}) == (204, None)
        (net,) = fresh.vmm.machine.config.nets
        assert (net.tap, net.mac) == ("fctap1", bytes.fromhex("0600ac100002"))
        assert [(n["iface_id"], n["host_dev_name"])
                for n in fresh("GET", "/vm/config")[1]["network-interfaces"]] == [("eth0",
                                                                                   "fctap1")]
        assert fresh("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    finally:
        fresh.close()


# --- the command line ---------------------------------------------------------------------------------
def firecracker(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pykvm", "firecracker", *args],
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_version_and_bad_flags():
    done = firecracker("--version")
    assert done.returncode == 0
    assert re.match(r"^Firecracker v1\.7\.0 \(pykvm-firecracker, pykvm \S+\)$", done.stdout.strip())
    done = firecracker("--no-api")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--no-api needs --config-file" in done.stderr


def test_the_process_serves_the_socket_until_signalled(tmp_path):
    sock = tmp_path / "api.sock"
    process = subprocess.Popen([sys.executable, "-m", "pykvm", "firecracker", "--api-sock",
                                str(sock), "--id", "proc1", "--show-level"],
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "[proc1:MainThread:INFO] API server started." in line
        assert call(str(sock), "GET", "/")[1]["id"] == "proc1"
        process.terminate()
        assert process.wait(timeout=30) == 0
        assert not sock.exists()
    finally:
        process.kill()
        process.wait()


def test_config_file_errors_are_one_line(tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                                  "cpu-config": {"cpuid_modifiers": []}}))
    done = firecracker("--no-api", "--config-file", str(config))
    assert done.returncode == 2 and "cpu-config is not supported by pykvm yet" in done.stderr
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(tmp_path / "none")}}))
    done = firecracker("--no-api", "--config-file", str(config))
    assert done.returncode == 2 and "The kernel file cannot be opened" in done.stderr
    assert done.stderr.count("\n") == 1


def test_config_file_no_api_starts_the_vm(tmp_path):
    kernel, initrd = guest_kernel()
    image = tmp_path / "data.img"
    image.write_bytes(b"\0" * 65536)
    config = tmp_path / "vm.json"
    boot = {"kernel_image_path": str(kernel), "boot_args": "quiet"}
    if initrd:
        boot["initrd_path"] = str(initrd)
    config.write_text(json.dumps({
        "boot-source": boot, "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "drives": [{"drive_id": "data", "path_on_host": str(image), "is_root_device": False}],
        "network-interfaces": [], "balloon": None}))
    process = subprocess.Popen([sys.executable, "-m", "pykvm", "firecracker", "--no-api",
                                "--config-file", str(config), "--id", "cfg"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "[cfg:MainThread] Running the microVM" in line, line
        process.terminate()
        assert process.wait(timeout=60) == 0
        assert "The microVM stopped" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


# --- pykvm's extension: user networking through passt ------------------------------------------------
def user_nic(iface_id, host_dev_name, **more):
    return {"iface_id": iface_id, "host_dev_name": host_dev_name, **more}


@pytest.mark.parametrize("name, message", [
    ("pykvm:passt=/tmp/x", "pykvm's only back end here is pykvm:user"),
    ("pykvm:tap=fctap0", "pykvm's only back end here is pykvm:user"),
    ("pykvm:", "unknown backend ''"),
    ("pykvm:user=x", "user takes no value"),
    ("pykvm:user,mac=06:00:ac:10:00:09", "give the MAC in guest_mac"),
    ("pykvm:user,fwd=tcp:0:80", "'0' is not a port"),
    ("pykvm:user,fwd=sctp:1:2", "use fwd=tcp:HOSTPORT:GUESTPORT"),
    ("pykvm:user,fwd=tcp:18090:80,fwd=tcp:18090:81", "forwarded twice"),
    ("pykvm:user,netns=x", "user has no option 'netns'"),
    ("pykvm:user,map-gw=maybe", "map-gw is on or off"),
    ("pykvm:user" + "".join(f",fwd=tcp:{20000 + i}:80" for i in range(65)), "at most 64 fwd="),
    ("user", "not an existing TAP device"),       # Firecracker's meaning: a TAP named user
])
def test_user_network_interface_refuses_bad_values(api, name, message):
    assert message in api.fault("PUT", "/network-interfaces/eth0", user_nic("eth0", name))
    assert api("GET", "/vm/config")[1]["network-interfaces"] == []


def test_user_network_interface_becomes_a_user_netspec(api, tmp_path):
    body = user_nic("eth0", "pykvm:user,fwd=tcp:18093:80,fwd=udp:18094:53,map-gw=off",
                    guest_mac="06:00:ac:10:00:02")
    assert api("PUT", "/network-interfaces/eth0", body) == (204, None)
    # A second user NIC gets a passt of its own; a host port cannot go to both.
    assert "host port tcp 18093 is already forwarded to eth0" in api.fault(
        "PUT", "/network-interfaces/eth1", user_nic("eth1", "pykvm:user,fwd=tcp:18093:22"))
    assert "MAC address is already in use" in api.fault(
        "PUT", "/network-interfaces/eth1", user_nic("eth1", "pykvm:user",
                                                    guest_mac="06:00:ac:10:00:02"))
    assert api("PUT", "/network-interfaces/eth1", user_nic("eth1", "pykvm:user")) == (204, None)
    # PUT again on the same id replaces it (its own forwards do not clash with themselves).
    assert api("PUT", "/network-interfaces/eth0", body) == (204, None)
    assert [n["host_dev_name"] for n in api("GET", "/vm/config")[1]["network-interfaces"]] == [
        body["host_dev_name"], "pykvm:user"]
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    assert api("PUT", "/boot-source", {"kernel_image_path": str(kernel)}) == (204, None)
    first, second = api.vmm.machine_config_for_start().nets
    assert (first.mode, first.tap, first.mac, first.map_gw) == (
        "user", None, bytes.fromhex("0600ac100002"), False)
    assert [str(f) for f in first.forwards] == ["tcp:18093:80", "udp:18094:53"]
    assert (second.mode, second.mac, second.forwards, second.map_gw) == ("user", None, (), True)


def test_user_network_interface_from_a_config_file(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    config = tmp_path / "vm.json"
    nic = user_nic("eth0", "pykvm:user,fwd=tcp:18095:80", guest_mac="06:00:ac:10:00:03")
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(kernel)},
                                  "network-interfaces": [nic]}))
    vmm = Vmm("x", Log("x", stream=io.StringIO()))
    vmm.apply_config_file(str(config))
    (net,) = vmm.machine_config_for_start().nets
    assert (net.mode, net.mac, [str(f) for f in net.forwards]) == (
        "user", bytes.fromhex("0600ac100003"), ["tcp:18095:80"])
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": str(kernel)},
                                  "network-interfaces": [{**nic, "host_dev_name": "pykvm:usr"}]}))
    done = firecracker("--no-api", "--config-file", str(config))
    assert done.returncode == 2 and "host_dev_name 'pykvm:usr'" in done.stderr
    assert done.stderr.count("\n") == 1


def _passt_children() -> list[int]:
    """The passt processes this test process started (children named passt or passt.avx2)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stream:
                stat = stream.read()
        except (OSError, ValueError):
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if name.split(".")[0] == "passt" and int(rest.split()[1]) == os.getpid():
            found.append(int(entry))
    return found


@needs_passt
def test_instance_start_with_a_user_nic_starts_passt(user_netns):
    """The machine is built (as InstanceStart does on the main thread) but never run:
    no guest boots. passt runs in the throwaway namespace, and is gone after close."""
    vmm = vmm_with_the_default_guest()
    try:
        vmm.put_network_interface("eth0", user_nic("eth0", "pykvm:user,fwd=tcp:18096:80"))
        assert _passt_children() == []
        vmm._start()
        (pid,) = _passt_children()
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        assert argv[argv.index(b"--tcp-ports") + 1] == b"18096:80"
    finally:
        vmm.close()
    assert _passt_children() == []
