"""vhost-user-blk (issue #16 item 5): a disk served by qemu-storage-daemon, or by any
vhost-user back end, instead of pykvm's own virtio-blk.

- the front end's sequence and payloads against the recording back end of
  tests/unit/test_vhost_user.py (GET_CONFIG for the device config, one queue handed over);
- --disk forms and the format found by content (the qcow2 magic), not by name;
- the real qemu-storage-daemon, driven from the host side of the transport (flush,
  GET_ID, read-only enforced by the daemon), by a flat ring-3 guest at native speed
  (the data it wrote read back from the qcow2 image with qemu-img), and killed while
  the guest has requests in flight (the device needs reset, the VM runs on).
"""

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykvm.devices.virtio.blk import (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR,
                                      VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                                      VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT)
from pykvm.devices.virtio.device import (STATUS_DRIVER_OK, STATUS_NEEDS_RESET,
                                         VIRTIO_F_VERSION_1)
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.vhost_blk import (CONFIG_SIZE, image_format, open_vhost_blk,
                                            probe_format, served_by_vhost_user)
from pykvm.errors import ConfigError, ImageError
from pykvm.machine.config import DiskSpec
from pykvm.memory import GuestMemory
from pykvm.vhost_user import protocol as p
from pykvm.vhost_user.protocol import Request, VhostUserError

from ..fakes import wait_for
from ..logs import pykvm_warnings
from ..unit.test_vhost_user import FakeBackend
from ..unit.test_virtio_blk import DATA, STATUS, offer_request

QSD = "/usr/bin/qemu-storage-daemon"
needs_qsd = pytest.mark.skipif(
    not os.access(QSD, os.X_OK) or shutil.which("qemu-img") is None,
    reason="qemu-storage-daemon or qemu-img missing (apt-get install qemu-system-common "
           "qemu-utils)")

BLK_FEATURES = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) \
    | (1 << 13) | (1 << 14)          # what qemu-storage-daemon 7.2 offers (and CONFIG_WCE, MQ...)
MiB = 1 << 20


def qemu_img(*args) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def make_qcow2(path: Path, size: int = 64 * MiB) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    return path


def blk_config(capacity: int) -> bytes:
    """A virtio_blk_config as a back end answers GET_CONFIG: capacity, seg_max 126,
    blk_size 512."""
    return struct.pack("<QII", capacity, 0, 126).ljust(20, b"\0") \
        + struct.pack("<I", 512).ljust(CONFIG_SIZE - 20, b"\0")


# --- the protocol, against the recording back end ------------------------------------------------
@pytest.fixture
def backend_path(tmp_path):
    return tmp_path / "backend.sock"


def test_sequence_config_and_one_queue_handed_over(backend_path):
    backend = FakeBackend(backend_path, features=(1 << 32) | p.F_PROTOCOL_FEATURES | BLK_FEATURES
                          | (1 << 28) | (1 << 29), config=blk_config(0x20000))
    try:
        with GuestMemory.anonymous(16 << 20) as memory:
            vm = StandInVm(memory)
            device = open_vhost_blk(DiskSpec("", socket=str(backend_path), backend="vhost-user"),
                                    "virtio-blk0")
            function = VirtioPciDevice(vm, memory, device,
                                       interrupt_lines=[RecordingLine(24 + i) for i in range(2)])
            try:
                assert backend.names() == ["GET_FEATURES", "GET_PROTOCOL_FEATURES",
                                           "SET_PROTOCOL_FEATURES", "SET_OWNER", "GET_CONFIG"]
                ask = backend.messages[-1]
                assert p.CONFIG_HEADER.unpack_from(ask.payload) == (0, CONFIG_SIZE, 0)
                driver = PciDriver(function)
                assert function.config.read(0, 4) == (0x1040 + 2) << 16 | 0x1AF4
                # the driver reads the back end's config: capacity and seg_max
                assert driver.read(0x2000, 4) | driver.read(0x2004, 4) << 32 == 0x20000
                assert driver.read(0x2000 + 12, 4) == 126
                # what pykvm's own virtio-blk offers (+ size_max, topology); not CONFIG_WCE,
                # MQ, DISCARD, WRITE_ZEROES, nor vhost-user's bit 30
                offered = driver.device_features()
                assert offered == (1 << 32) | (1 << 28) | (1 << 29) | (1 << 1) | (1 << 2) \
                    | (1 << 6) | (1 << 9) | (1 << 10)
                assert driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH) & 8
                ring = DriverRing(memory, 0x100000, 128)
                driver.setup_queue(0, ring)
                before = len(backend.messages)
                driver.driver_ok()
                assert driver.status() & STATUS_DRIVER_OK
                assert not driver.status() & STATUS_NEEDS_RESET
                assert backend.names()[before:] == [
                    "SET_FEATURES", "SET_MEM_TABLE", "SET_VRING_NUM", "SET_VRING_BASE",
                    "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ENABLE"]
                features = [m for m in backend.messages if m.request == Request.SET_FEATURES][0]
                assert struct.unpack("<Q", features.payload)[0] == \
                    VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | p.F_PROTOCOL_FEATURES
                num = [m for m in backend.messages if m.request == Request.SET_VRING_NUM][0]
                assert p.VRING_STATE.unpack(num.payload) == (0, 128)
            finally:
                function.close()
                vm.close()
    finally:
        backend.close()


def test_ro_on_a_writable_back_end_is_refused(backend_path):
    backend = FakeBackend(backend_path, features=(1 << 32) | p.F_PROTOCOL_FEATURES | BLK_FEATURES,
                          config=blk_config(8))
    try:
        with pytest.raises(VhostUserError, match="writable"):
            open_vhost_blk(DiskSpec.parse(f"vhost-user={backend_path},ro"), "virtio-blk0")
    finally:
        backend.close()


def test_a_back_end_without_config_or_capacity_is_refused(backend_path):
    backend = FakeBackend(backend_path, config=blk_config(0))
    try:
        with pytest.raises(VhostUserError, match="capacity of 0"):
            open_vhost_blk(DiskSpec.parse(f"vhost-user={backend_path}"), "virtio-blk0")
    finally:
        backend.close()
    other = backend_path.with_name("other.sock")
    backend = FakeBackend(other, protocol_features=p.PROTOCOL_F_REPLY_ACK)
    try:
        with pytest.raises(VhostUserError, match="no device configuration"):
            open_vhost_blk(DiskSpec.parse(f"vhost-user={other}"), "virtio-blk0")
    finally:
        backend.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a back end as another user")
def test_a_back_end_run_by_another_user_is_refused():
    """It would map the guest's RAM: SO_PEERCRED says who listens, whatever the socket's
    path or mode (an abstract socket here: no file system permissions at all)."""
    name = f"pykvm-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = subprocess.Popen(
        ["/usr/bin/python3", "-c", "import socket, sys, time\n"
         "s = socket.socket(socket.AF_UNIX)\n"
         f"s.bind('\\0{name}'); s.listen(1); print('ready', flush=True); time.sleep(30)"],
        user=65534, group=65534, extra_groups=[], cwd="/", stdout=subprocess.PIPE)
    try:
        assert listener.stdout.readline() == b"ready\n"
        with pytest.raises(VhostUserError, match="uid 65534 may not use"):
            open_vhost_blk(DiskSpec.parse(f"vhost-user=\0{name}"), "virtio-blk0")
    finally:
        listener.kill()
        listener.wait()


# --- --disk forms, the format by content -----------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("a.img", DiskSpec("a.img")),
    ("a.img,backend=vhost-user,ro", DiskSpec("a.img", read_only=True, backend="vhost-user")),
    ("a.img,format=raw", DiskSpec("a.img", format="raw")),
    ("a.img,format=qcow2,backend=vhost-user", DiskSpec("a.img", format="qcow2",
                                                       backend="vhost-user")),
    ("vhost-user=/run/blk.sock", DiskSpec("", socket="/run/blk.sock", backend="vhost-user")),
    ("vhost-user=/run/blk.sock,ro", DiskSpec("", read_only=True, socket="/run/blk.sock",
                                             backend="vhost-user")),
])
def test_disk_forms(text, expected):
    assert DiskSpec.parse(text) == expected
    assert DiskSpec.parse(expected.option_text()) == expected


@pytest.mark.parametrize("text", ["vhost-user=", "a.img,backend=qemu", "a.img,format=vmdk",
                                  "a.img,format=qcow2,backend=pykvm",
                                  "vhost-user=/s,format=raw", "vhost-user=/s,backend=pykvm"])
def test_disk_form_errors(text):
    with pytest.raises(ConfigError):
        DiskSpec.parse(text)


@needs_qsd
def test_qcow2_is_found_by_content_not_by_name(tmp_path):
    qcow2 = make_qcow2(tmp_path / "disk.img")
    raw = tmp_path / "raw.qcow2"
    raw.write_bytes(bytes(1 << 20))
    assert (probe_format(str(qcow2)), probe_format(str(raw))) == ("qcow2", "raw")
    assert served_by_vhost_user(DiskSpec.parse(str(qcow2)))
    assert not served_by_vhost_user(DiskSpec.parse(str(raw)))
    assert served_by_vhost_user(DiskSpec.parse(f"{raw},backend=vhost-user"))
    # format=raw: no probe (a guest could write the magic into a raw disk's first sector)
    assert not served_by_vhost_user(DiskSpec.parse(f"{qcow2},format=raw"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert probe_format(str(fifo)) == "raw"        # at once: the open that follows says why


@needs_qsd
def test_qcow2_naming_another_file_is_refused(tmp_path):
    base = make_qcow2(tmp_path / "base.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
    external = tmp_path / "external.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}",
             external, 1 * MiB)
    for image, why in ((overlay, "backing file"), (external, "external file")):
        fd = os.open(image, os.O_RDONLY)
        try:
            with pytest.raises(ImageError, match=why):
                image_format(fd, str(image))
        finally:
            os.close(fd)
        with pytest.raises(ImageError, match=why):
            open_vhost_blk(DiskSpec.parse(str(image)), "virtio-blk0")
    truncated = tmp_path / "short.img"
    truncated.write_bytes(b"QFI\xfb\0\0\0\3")
    with pytest.raises(ImageError, match="truncated"):
        probe_format(str(truncated))


# --- the real qemu-storage-daemon, driven from the transport's host side -------------------------


class HostDriver:
    """A VhostBlkDevice on a VirtioPciDevice, the driver played from the host: requests
    go from guest RAM to the daemon through the kick eventfd, as a guest's would."""

    def __init__(self, memory, device):
        self.memory = memory
        self.vm = StandInVm(memory)
        self.function = VirtioPciDevice(self.vm, memory, device,
                                        interrupt_lines=[RecordingLine(24 + i) for i in range(2)])
        self.driver = PciDriver(self.function)
        assert self.driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH) & 8
        self.ring = DriverRing(memory, 0x100000, 16)
        self.driver.setup_queue(0, self.ring)
        self.driver.driver_ok()
        assert not self.driver.status() & STATUS_NEEDS_RESET

    def request(self, kind, sector=0, data=b"", read=0) -> tuple[int, int]:
        offer_request(self.memory, self.ring, kind, sector, read, data)
        self.driver.notify(0)
        used = []
        assert wait_for(lambda: used.extend(self.ring.take_used()) or used), "no completion"
        (_, written), = used
        return self.memory.read_u8(STATUS), written

    def close(self):
        self.function.close()
        self.vm.close()


@needs_qsd
def test_qemu_storage_daemon_reads_writes_flushes_and_answers_get_id(tmp_path):
    image = make_qcow2(tmp_path / "disk.qcow2", 8 * MiB)
    with GuestMemory.anonymous(16 << 20) as memory:
        device = open_vhost_blk(DiskSpec.parse(str(image)), "virtio-blk0")
        assert device.capacity == 8 * MiB // 512 and device.daemon.alive
        assert not device.daemon.directory.exists()      # nothing of it left on disk
        host = HostDriver(memory, device)
        try:
            assert host.request(VIRTIO_BLK_T_OUT, 5, b"written by the guest".ljust(512, b"."))[0] \
                == VIRTIO_BLK_S_OK
            assert host.request(VIRTIO_BLK_T_FLUSH) == (VIRTIO_BLK_S_OK, 1)
            memory.write(DATA, bytes(1024))
            assert host.request(VIRTIO_BLK_T_IN, 4, read=1024) == (VIRTIO_BLK_S_OK, 1025)
            assert memory.read(DATA + 512, 20) == b"written by the guest"
            status, written = host.request(VIRTIO_BLK_T_GET_ID, read=20)
            assert status == VIRTIO_BLK_S_OK and memory.read(DATA, 14) == b"vhost_user_blk"
            # past the end: the daemon's I/O error, the device stays up
            assert host.request(VIRTIO_BLK_T_IN, 8 * MiB // 512, read=512)[0] == VIRTIO_BLK_S_IOERR
            assert not host.driver.status() & STATUS_NEEDS_RESET
        finally:
            host.close()
    # flushed and stopped: qemu-img sees the data (and the image is consistent)
    qemu_img("check", "-q", image)
    data = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x2e 2580 492",
                           str(image)], capture_output=True, text=True)
    assert "read 492/492 bytes" in data.stdout and "Pattern verification failed" not in \
        data.stdout, data.stdout + data.stderr


@needs_qsd
def test_read_only_is_enforced_by_the_daemon_not_only_advertised(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x5a" * (1 * MiB))
    with GuestMemory.anonymous(16 << 20) as memory:
        device = open_vhost_blk(DiskSpec.parse(f"{image},backend=vhost-user,ro"), "virtio-blk0")
        assert device.read_only and device.frontend.features & VIRTIO_BLK_F_RO
        host = HostDriver(memory, device)        # a driver that ignores VIRTIO_BLK_F_RO
        try:
            assert host.request(VIRTIO_BLK_T_OUT, 0, b"\0" * 512)[0] == VIRTIO_BLK_S_IOERR
            assert host.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_OK
            assert host.request(VIRTIO_BLK_T_IN, 0, read=512)[0] == VIRTIO_BLK_S_OK
            assert memory.read(DATA, 512) == b"\x5a" * 512
        finally:
            host.close()
    assert image.read_bytes() == b"\x5a" * (1 * MiB)


@needs_qsd
def test_a_locked_image_and_a_daemon_that_cannot_start_say_why(tmp_path):
    from pykvm.devices.virtio.blk import BlockDevice
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(MiB))
    own = BlockDevice(str(image))
    try:
        with pytest.raises(ImageError, match="locked"):
            open_vhost_blk(DiskSpec.parse(f"{image},backend=vhost-user"), "virtio-blk0")
    finally:
        own.close()
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + struct.pack(">IQI", 3, 0, 0) + bytes(1000))
    with pytest.raises(VhostUserError, match="virtio-blk0: the back end exited"):
        open_vhost_blk(DiskSpec.parse(str(broken)), "virtio-blk0")
    with pytest.raises(ConfigError, match="serial"):
        open_vhost_blk(DiskSpec.parse(f"{image},backend=vhost-user,serial=x"), "virtio-blk0")


# --- a flat ring-3 guest (bench/blk.py's) drives the queue -------------------------------------------
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def blk_bench():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import blk
    return blk


@pytest.fixture
def flat_guest(blk_bench, tmp_path):
    return blk_bench.assemble(blk_bench.GUEST_SOURCE, tmp_path, blk_bench.LOAD_ADDR)


@needs_qsd
def test_a_ring3_guest_writes_a_qcow2_image_read_back_with_qemu_img(kvm, blk_bench, flat_guest,
                                                                    tmp_path):
    """The guest keeps 8 writes of 4 KiB in flight at random sectors for a moment; after
    the VM closes (the daemon flushes and exits), qemu-img turns the qcow2 image into a
    raw one and every slot's last write is there."""
    size = 64 * MiB
    image = make_qcow2(tmp_path / "guest-disk", size)        # no .qcow2: found by content
    device = open_vhost_blk(DiskSpec.parse(str(image)), "virtio-blk0")
    pid = device.daemon.process.pid
    disk = blk_bench.GuestDisk(kvm, flat_guest, device, wait=True)
    case = blk_bench.Case("rand write 4 KiB", True, 4096, True)
    try:
        disk.run(case, 8, image, size, 0.05, 0.3, check=False)
        assert disk.get("completed") > 8
        written = disk.last_requests(case, 8)
    finally:
        disk.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    raw = tmp_path / "back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, raw)
    with open(raw, "rb") as f:
        for sector, data in written:
            f.seek(sector * 512)
            assert f.read(len(data)) == data, f"sector {sector}"


@needs_qsd
def test_a_daemon_killed_mid_io_leaves_the_vm_running_and_the_device_needing_reset(
        kvm, blk_bench, flat_guest, tmp_path, caplog):
    size = 64 * MiB
    image = make_qcow2(tmp_path / "disk.qcow2", size)
    device = open_vhost_blk(DiskSpec.parse(str(image)), "virtio-blk0")
    disk = blk_bench.GuestDisk(kvm, flat_guest, device, wait=True)
    try:
        disk.prepare(blk_bench.Case("rand read 4 KiB", False, 4096, True), 32, size)
        disk.commands.pending.put(1)
        assert wait_for(lambda: disk.get("completed") > 1000, 30), "the guest does no I/O"
        os.kill(device.daemon.process.pid, 9)          # with 32 requests in flight
        assert wait_for(lambda: disk.function.status & STATUS_NEEDS_RESET, 10)
        completed, waits = disk.get("completed"), disk.get("waits")
        time.sleep(0.3)
        # the VM runs on: its vCPU still reads the wait register, nothing completes
        assert disk.vm.stop_reason is None and disk.get("waits") > waits
        assert disk.get("completed") == completed
        lines = pykvm_warnings(caplog)
        assert len(lines) == 1, lines
        assert "virtio-blk0" in lines[0] and "killed by signal 9" in lines[0] \
            and "needs reset" in lines[0]
    finally:
        disk.close()


# --- the Firecracker API: a drive whose path_on_host is a qcow2 image --------------------------------
@needs_qsd
def test_a_firecracker_qcow2_drive_is_served_over_vhost_user(tmp_path):
    from .test_firecracker_api import Api
    image = make_qcow2(tmp_path / "rootfs", 8 * MiB)
    raw = tmp_path / "data.img"
    raw.write_bytes(bytes(MiB))
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    api = Api(tmp_path)
    try:
        for drive_id, path in (("rootfs", image), ("data", raw)):
            assert api("PUT", f"/drives/{drive_id}", {
                "drive_id": drive_id, "path_on_host": str(path),
                "is_root_device": drive_id == "rootfs", "is_read_only": False}) == (204, None)
        assert api("PUT", "/boot-source", {"kernel_image_path": str(kernel)}) == (204, None)
        qcow2, own = api.vmm.machine_config_for_start().disks
    finally:
        api.close()
    assert served_by_vhost_user(qcow2) and qcow2.serial == ""   # the daemon answers GET_ID
    assert not served_by_vhost_user(own) and own.serial == "data"
    device = open_vhost_blk(qcow2, "virtio-blk0")
    try:
        assert device.capacity == 8 * MiB // 512 and device.daemon.alive
    finally:
        device.close()


# --- the Firecracker API: a vhost-user-block drive (PUT /drives "socket") -----------------------------
@needs_qsd
def test_a_firecracker_socket_drive_is_a_vhost_user_disk(tmp_path):
    """Firecracker's vhost-user-block drive: ``socket`` instead of ``path_on_host``,
    the back end the client runs; pykvm attaches it as ``--disk vhost-user=SOCKET``."""
    import socket as sockets

    from pykvm.vhost_user.daemon import start_storage_daemon

    from .test_firecracker_api import Api
    raw = tmp_path / "data.img"
    raw.write_bytes(bytes(MiB))
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    fd = os.open(raw, os.O_RDWR | os.O_CLOEXEC)
    daemon = start_storage_daemon(fd, "raw", name="client-vhost-blk")
    not_a_socket = tmp_path / "plain"
    not_a_socket.write_bytes(b"")
    drive = {"drive_id": "data", "socket": daemon.socket_path, "is_root_device": False}
    api = Api(tmp_path)
    try:
        assert "exactly one is required" in api.fault(
            "PUT", "/drives/data", {**drive, "path_on_host": str(raw)})
        assert "exactly one is required" in api.fault(
            "PUT", "/drives/data", {"drive_id": "data", "is_root_device": False})
        assert "is not a Unix socket" in api.fault(
            "PUT", "/drives/data", {**drive, "socket": str(not_a_socket)})
        assert "Unable to connect to the vhost-user-block socket" in api.fault(
            "PUT", "/drives/data", {**drive, "socket": str(tmp_path / "none")})
        assert "cannot be rate-limited" in api.fault("PUT", "/drives/data", {
            **drive, "rate_limiter": {"ops": {"size": 10, "refill_time": 100}}})
        assert "socket" in api.fault("PUT", "/drives/data", {**drive, "socket": 3})
        assert api("PUT", "/drives/data", drive) == (204, None)
        (shown,) = api("GET", "/vm/config")[1]["drives"]
        assert shown.items() >= drive.items() and "path_on_host" not in shown
        assert api("PUT", "/boot-source", {"kernel_image_path": str(kernel)}) == (204, None)
        (spec,) = api.vmm.machine_config_for_start().disks
    finally:
        api.close()
    assert spec == DiskSpec("", socket=daemon.socket_path, backend="vhost-user")
    assert served_by_vhost_user(spec)
    device = open_vhost_blk(spec, "virtio-blk0")     # connects to the client's daemon
    try:
        assert device.capacity == MiB // 512 and device.daemon is None
    finally:
        device.close()
        daemon.stop()
        os.close(fd)
