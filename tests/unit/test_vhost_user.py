"""vhost-user (issue #16): shareable guest RAM, the front end's message sequence
against a recording fake back end, and the real virtiofsd.

The fake back end (:class:`FakeBackend`) is a small daemon on a thread: it answers
the front end over a real Unix socket, receives the real fds (SCM_RIGHTS), maps the
memfd it is given and records every message, so the tests check both the order
and the payloads -- and that what the back end maps is the guest's RAM.
"""

import array
import contextlib
import errno
import fcntl
import mmap
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest

from pykvm.devices.virtio.device import STATUS_DRIVER_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.fs import FsDevice, FsSpec
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from pykvm.vhost_user import protocol as p
from pykvm.vhost_user.frontend import Frontend, Vring
from pykvm.vhost_user.protocol import Request, VhostUserError

from ..fakes import wait_for
from ..logs import pykvm_warnings

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


# --- item 1: shareable guest RAM ---------------------------------------------------------------
def test_guest_ram_is_a_sealed_memfd_another_mapping_shares():
    with GuestMemory.anonymous(8 << 20) as memory:
        assert memory.shareable and os.readlink(f"/proc/self/fd/{memory.fd}").startswith(
            "/memfd:pykvm-guest-ram")
        other = mmap.mmap(memory.fd, 8 << 20, flags=mmap.MAP_SHARED)
        memory.write(0x12345, b"from the guest")
        assert other[0x12345:0x12345 + 14] == b"from the guest"   # one set of pages
        other[0x2000:0x2004] = b"back"
        assert memory.read(0x2000, 4) == b"back"
        other.close()
        # a back end cannot shrink (SIGBUS for pykvm) or grow it
        for size in (4096, 16 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(memory.fd, size)
        fd = memory.fd
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF


def test_ram_above_the_pci_hole_is_a_second_region_of_the_same_memfd():
    with GuestMemory.anonymous(4 << 30) as memory:
        low, high = memory.regions
        assert (high.guest_addr, high.file_offset) == (1 << 32, low.size)
        memory.write(high.guest_addr + 8, b"high")
        assert os.pread(memory.fd, 4, high.file_offset + 8) == b"high"
        assert memory.host_address(high.guest_addr + 8, 4) == high.host_addr + 8


# --- a recording back end ------------------------------------------------------------------------
@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list = field(default_factory=list)


class FakeBackend:
    """A vhost-user back end on a thread: answers GET_*, acks with REPLY_ACK, records
    everything, maps SET_MEM_TABLE's fds. ``hang_up_after``: close the connection after
    that many messages (a back end that dies)."""

    def __init__(self, path, *, features=(1 << 32) | p.F_PROTOCOL_FEATURES,
                 protocol_features=p.PROTOCOL_F_REPLY_ACK | p.PROTOCOL_F_CONFIG | (1 << 15),
                 config=b"", hang_up_after=None, refuse=None):
        self.features = features
        self.protocol_features = protocol_features
        self.config = config
        self.hang_up_after = hang_up_after
        self.refuse = refuse
        self.messages: list[Message] = []
        self.calls: dict[int, int] = {}     # queue -> the call eventfd it was given (a dup)
        self.mapped: list[mmap.mmap] = []
        self.acked = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _receive(self, conn):
        fds = array.array("i")
        data, ancillary, _, _ = conn.recvmsg(p.HEADER.size, socket.CMSG_SPACE(8 * 4))
        if not data:
            return None
        for level, kind, body in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(body[:len(body) - len(body) % fds.itemsize])
        request, flags, size = p.HEADER.unpack(data)
        payload = b""
        while len(payload) < size:
            payload += conn.recv(size - len(payload))
        return Message(request, flags, payload, list(fds))

    def _reply(self, conn, message, payload):
        conn.sendall(p.encode(message.request, payload, reply=True))

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            while True:
                message = self._receive(conn)
                if message is None:
                    return
                self.messages.append(message)
                if self.hang_up_after is not None and len(self.messages) >= self.hang_up_after:
                    for fd in message.fds:      # the memfd too: it would outlive the test
                        os.close(fd)
                    return
                request = message.request
                if request == Request.GET_FEATURES:
                    self._reply(conn, message, p.u64(self.features))
                elif request == Request.GET_PROTOCOL_FEATURES:
                    self._reply(conn, message, p.u64(self.protocol_features))
                elif request == Request.GET_VRING_BASE:
                    index, _ = p.VRING_STATE.unpack(message.payload)
                    self._reply(conn, message, p.vring_state(index, 7))
                elif request == Request.GET_CONFIG:
                    offset, size, _ = p.CONFIG_HEADER.unpack_from(message.payload)
                    self._reply(conn, message, p.CONFIG_HEADER.pack(offset, size, 0)
                                + self.config[offset:offset + size].ljust(size, b"\0"))
                elif request == Request.SET_MEM_TABLE:
                    for region, fd in zip(p.decode_memory_table(message.payload), message.fds):
                        self.mapped.append(mmap.mmap(fd, region.size, flags=mmap.MAP_SHARED,
                                                     offset=region.mmap_offset))
                elif request == Request.SET_VRING_CALL and message.fds:
                    old = self.calls.get(message.payload[0])   # swapped (MSI-X masking)
                    self.calls[message.payload[0]] = os.dup(message.fds[0])
                    if old is not None:
                        os.close(old)
                if message.flags & p.FLAG_NEED_REPLY:
                    self.acked += 1
                    self._reply(conn, message, p.u64(1 if request == self.refuse else 0))
                for fd in message.fds:
                    os.close(fd)

    def names(self):
        return [Request(m.request).name for m in self.messages]

    def close(self):
        self.listener.close()
        self.thread.join(timeout=5)
        for mapping in self.mapped:
            mapping.close()
        for fd in self.calls.values():
            os.close(fd)


@pytest.fixture
def backend_path(tmp_path):
    return tmp_path / "backend.sock"


@contextlib.contextmanager
def two_vrings(frontend: Frontend):
    """Two 128-entry vrings in guest RAM at 0x10000 on (queue i 0x4000 further), each
    with its kick and call eventfds; on leaving, ``frontend`` is closed, then the fds."""
    kicks = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    calls = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    vrings = [Vring(i, 128, 0x10000 + i * 0x4000, 0x10800 + i * 0x4000,
                    0x11000 + i * 0x4000, kicks[i], calls[i]) for i in range(2)]
    try:
        yield vrings
    finally:
        frontend.close()
        for fd in kicks + calls:
            os.close(fd)


def test_frontend_sequence_and_payloads(backend_path):
    backend = FakeBackend(backend_path, config=b"tag-bytes")
    try:
        with GuestMemory.anonymous(4 << 30) as memory:
            frontend = Frontend.connect(str(backend_path), "test")
            assert frontend.protocol_features == p.PROTOCOL_F_REPLY_ACK | p.PROTOCOL_F_CONFIG
            assert frontend.get_config(4, 5) == b"bytes"
            with two_vrings(frontend) as vrings:
                frontend.start(1 << 32, memory, vrings)
                memory.write(0x1000, b"guest data")
                assert backend.mapped[0][0x1000:0x100A] == b"guest data"   # the same pages
                memory.write((1 << 32) + 0x40, b"high")
                assert backend.mapped[1][0x40:0x44] == b"high"
                assert frontend.stop() == {0: 7, 1: 7}
                host_addrs = [r.host_addr for r in memory.regions]
        time.sleep(0.1)
    finally:
        backend.close()
    ring = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
            "SET_VRING_CALL"]
    assert backend.names() == (
        ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "SET_OWNER",
         "GET_CONFIG", "SET_FEATURES", "SET_MEM_TABLE"] + ring + ring
        + ["SET_VRING_ENABLE"] * 2 + ["SET_VRING_ENABLE"] * 2 + ["GET_VRING_BASE"] * 2)
    by_name = {}
    for message in backend.messages:
        by_name.setdefault(Request(message.request).name, []).append(message)
        assert message.flags & p.FLAG_VERSION_MASK == 1
    # REPLY_ACK: asked for on every request without a reply of its own, after negotiation
    assert not by_name["SET_PROTOCOL_FEATURES"][0].flags & p.FLAG_NEED_REPLY
    assert by_name["SET_OWNER"][0].flags & p.FLAG_NEED_REPLY
    assert not by_name["GET_VRING_BASE"][0].flags & p.FLAG_NEED_REPLY
    assert backend.acked == 1 + 1 + 1 + 2 * 5 + 4
    assert struct.unpack("<Q", by_name["SET_FEATURES"][0].payload)[0] == \
        (1 << 32) | p.F_PROTOCOL_FEATURES
    table = by_name["SET_MEM_TABLE"][0]
    regions = p.decode_memory_table(table.payload)
    assert [(r.guest_addr, r.size, r.mmap_offset) for r in regions] == \
        [(0, 3 << 30, 0), (1 << 32, 1 << 30, 3 << 30)]
    assert [r.user_addr for r in regions] == host_addrs
    assert len(table.fds) == 2
    assert p.VRING_ADDR.unpack(by_name["SET_VRING_ADDR"][1].payload)[:2] == (1, 0)
    assert [struct.unpack("<Q", m.payload)[0] for m in by_name["SET_VRING_KICK"]] == [0, 1]
    assert all(len(m.fds) == 1 for m in by_name["SET_VRING_KICK"] + by_name["SET_VRING_CALL"])
    assert [p.VRING_STATE.unpack(m.payload) for m in by_name["SET_VRING_ENABLE"]] == \
        [(0, 1), (1, 1), (0, 0), (1, 0)]


def test_ring_addresses_are_pykvm_virtual_addresses(backend_path):
    backend = FakeBackend(backend_path)
    try:
        with GuestMemory.anonymous(4 << 20) as memory:
            frontend = Frontend.connect(str(backend_path), "test")
            with two_vrings(frontend) as vrings:
                frontend.start(1 << 32, memory, vrings)
            time.sleep(0.1)
            addr = [m for m in backend.messages if m.request == Request.SET_VRING_ADDR][0]
            _, _, desc, used, avail, _ = p.VRING_ADDR.unpack(addr.payload)
            base = memory.regions[0].host_addr
            assert (desc, used, avail) == (base + 0x10000, base + 0x11000, base + 0x10800)
    finally:
        backend.close()


def test_without_protocol_features_no_enable_and_no_acks(backend_path):
    backend = FakeBackend(backend_path, features=1 << 32)
    try:
        with GuestMemory.anonymous(4 << 20) as memory:
            frontend = Frontend.connect(str(backend_path), "test")
            with two_vrings(frontend) as vrings:
                frontend.start(1 << 32, memory, vrings)
                frontend.stop()
        time.sleep(0.1)
    finally:
        backend.close()
    assert "GET_PROTOCOL_FEATURES" not in backend.names()
    assert "SET_VRING_ENABLE" not in backend.names()
    assert backend.acked == 0


def test_a_refused_request_is_an_error(backend_path):
    backend = FakeBackend(backend_path, refuse=Request.SET_MEM_TABLE)
    try:
        with GuestMemory.anonymous(4 << 20) as memory:
            frontend = Frontend.connect(str(backend_path), "test")
            with two_vrings(frontend) as vrings:
                with pytest.raises(VhostUserError, match="refused SET_MEM_TABLE"):
                    frontend.start(1 << 32, memory, vrings)
    finally:
        backend.close()


def test_a_back_end_that_hangs_up_is_an_error_and_is_seen(backend_path):
    backend = FakeBackend(backend_path, hang_up_after=6)
    lost = threading.Event()
    try:
        with GuestMemory.anonymous(4 << 20) as memory:
            frontend = Frontend.connect(str(backend_path), "test")
            frontend.watch(lambda reason: lost.set())
            with two_vrings(frontend) as vrings:
                with pytest.raises(VhostUserError, match="closed the connection"):
                    frontend.start(1 << 32, memory, vrings)
                assert lost.wait(5)
    finally:
        backend.close()


def test_header_checks():
    with pytest.raises(VhostUserError, match="version"):
        p.Header.decode(p.HEADER.pack(1, 2, 0))
    with pytest.raises(VhostUserError, match="at most"):
        p.Header.decode(p.HEADER.pack(1, 1 | p.FLAG_REPLY, p.MAX_PAYLOAD + 1))
    with pytest.raises(VhostUserError, match="queue 3"):
        p.decode_vring_state(p.vring_state(3, 5), 1)


# --- the transport hands the queues over ----------------------------------------------------------
@pytest.fixture
def fs_function(backend_path):
    backend = FakeBackend(backend_path)
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        device = FsDevice(Frontend.connect(str(backend_path), "virtio-fs0"), "mytag")
        function = VirtioPciDevice(vm, memory, device,
                                   interrupt_lines=[RecordingLine(24 + i) for i in range(3)])
        yield function, backend, vm
        function.close()
        vm.close()
    backend.close()


def test_virtio_fs_identity_config_and_hand_over(fs_function):
    function, backend, vm = fs_function
    driver = PciDriver(function)
    assert function.config.read(0, 4) == (0x1040 + 26) << 16 | 0x1AF4
    tag = bytes(driver.read(0x2000 + i, 1) for i in range(36))
    assert tag == b"mytag".ljust(36, b"\0") and driver.read(0x2000 + 36, 4) == 1
    # the driver sees the back end's features, less vhost-user's own bit 30
    assert driver.device_features() & p.F_PROTOCOL_FEATURES == 0
    assert driver.negotiate(VIRTIO_F_VERSION_1) & 8
    rings = [DriverRing(vm.memory, 0x100000 + i * 0x10000, 128) for i in range(2)]
    for index, ring in enumerate(rings):
        driver.setup_queue(index, ring)
    before = len(backend.messages)
    driver.driver_ok()
    assert driver.status() & STATUS_DRIVER_OK and not driver.status() & STATUS_NEEDS_RESET
    handed = backend.names()[before:]
    assert handed[:2] == ["SET_FEATURES", "SET_MEM_TABLE"] and handed.count("SET_VRING_KICK") == 2
    addr = [m for m in backend.messages if m.request == Request.SET_VRING_ADDR][1]
    assert p.VRING_ADDR.unpack(addr.payload)[2] == \
        vm.memory.host_address(rings[1].desc_addr, 16)
    # the back end's call eventfd becomes the driver's interrupt (INTx here: ISR bit 0)
    os.eventfd_write(backend.calls[1], 1)
    assert wait_for(lambda: driver.read(0x1000, 1) == 1)
    # a guest notify reaches the back end's kick fd (the ioeventfd KVM would signal)
    kick = [m for m in backend.messages if m.request == Request.SET_VRING_KICK][0]
    assert kick.fds    # received (and closed by the fake after recording)
    # reset: the back end stops its rings
    driver.write(0x14, 1, 0)
    assert backend.names()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]
    with pytest.raises(p.VhostUserError, match="cannot be snapshotted"):
        function.save_state()


def test_a_back_end_that_dies_leaves_the_device_needing_reset(backend_path, caplog):
    backend = FakeBackend(backend_path, hang_up_after=8)
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        device = FsDevice(Frontend.connect(str(backend_path), "virtio-fs0"), "t")
        function = VirtioPciDevice(vm, memory, device,
                                   interrupt_lines=[RecordingLine(24 + i) for i in range(3)])
        try:
            driver = PciDriver(function)
            driver.negotiate(VIRTIO_F_VERSION_1)
            for index in range(2):
                driver.setup_queue(index, DriverRing(memory, 0x100000 + index * 0x10000, 128))
            driver.driver_ok()      # the back end hangs up in the middle: no exception here
            assert wait_for(lambda: driver.status() & STATUS_NEEDS_RESET)
            assert not function.running
            lines = pykvm_warnings(caplog)
            assert len(lines) == 1 and "virtio-fs" in lines[0] and "needs reset" in lines[0]
            # the driver resets and tries again: refused again, still one line
            driver.write(0x14, 1, 0)
            driver.negotiate(VIRTIO_F_VERSION_1)
            driver.driver_ok()
            assert driver.status() & STATUS_NEEDS_RESET
            assert len(pykvm_warnings(caplog)) == 1
        finally:
            function.close()
            vm.close()
    backend.close()


def test_share_options():
    assert FsSpec.parse_share("/d,ro,tag=src", 0) == FsSpec("src", source="/d", read_only=True)
    assert FsSpec.parse_share("/d", 1).tag == "pykvm-share1"
    assert FsSpec.parse_socket("/s.sock,tag=x") == FsSpec("x", socket="/s.sock")
    for bad in ("/d,tag=", "/d,tag=a b", "/d,tag=" + "x" * 37, "/d,rw,what"):
        with pytest.raises(ConfigError):
            FsSpec.parse_share(bad, 0)
    with pytest.raises(ConfigError):
        FsSpec.parse_socket("/s.sock")


# --- the real virtiofsd ------------------------------------------------------------------------------
needs_virtiofsd = pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK),
                                     reason="virtiofsd missing (apt-get install qemu-system-common)")


@needs_virtiofsd
def test_virtiofsd_takes_the_queues_and_is_stopped(tmp_path):
    from pykvm.vhost_user.daemon import start_virtiofsd
    daemon = start_virtiofsd(str(tmp_path), name="virtio-fs0")
    directory, pid = daemon.directory, daemon.process.pid
    assert directory.stat().st_mode & 0o777 == 0o700
    try:
        frontend = Frontend.connect(daemon.socket_path, "virtio-fs0")
        daemon.connected()       # the directory goes; the connection and the daemon stay
        assert not directory.exists() and daemon.alive
        assert frontend.features & (1 << 32) and frontend.reply_ack
        with GuestMemory.anonymous(16 << 20) as memory:
            with two_vrings(frontend) as vrings:
                frontend.start(1 << 32, memory, vrings)      # every request acknowledged
                assert set(frontend.stop()) == {0, 1}
    finally:
        daemon.stop()
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@needs_virtiofsd
def test_a_daemon_that_cannot_start_says_why(tmp_path):
    from pykvm.vhost_user.daemon import start_virtiofsd
    with pytest.raises(VhostUserError, match="not a directory"):
        start_virtiofsd(str(tmp_path / "missing"))


# --- the transport's common configuration, field by field (issue #14 item 6) ---------------------
def test_common_config_partial_and_straddling_accesses():
    from pykvm.devices.virtio.rng import RngDevice
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        function = VirtioPciDevice(vm, memory, RngDevice(),
                                   interrupt_lines=[RecordingLine(24 + i) for i in range(2)])
        try:
            driver = PciDriver(function)
            driver.write(0x20, 4, 0x89ABC000)            # queue_desc, as two 32-bit halves
            driver.write(0x24, 4, 0x1)
            assert function.queues[0].desc_addr == 0x1_89ABC000
            assert driver.read(0x20, 8) == 0x1_89ABC000 and driver.read(0x21, 1) == 0xC0
            driver.write(0x18, 2, 64)
            # one 4-byte read across queue_select (0) and queue_size (64)
            assert driver.read(0x16, 4) == 64 << 16
            assert driver.read(0x12, 2) == 1 and driver.read(0x38, 4) == 0   # num_queues; reserved
            driver.write(0x38, 4, 0xFFFFFFFF)                             # ignored
            driver.write(0x16, 2, 5)                                      # no such queue
            assert driver.read(0x18, 2) == 0 and driver.read(0x1A, 2) == 0xFFFF
        finally:
            function.close()
            vm.close()


@needs_virtiofsd
def test_a_killed_virtiofsd_is_one_line_with_its_end(tmp_path, caplog):
    """The hang-up watcher runs confined (seccomp) and still learns how the daemon ended
    (it once ran in the device role, where wait4 kills pykvm with SIGSYS)."""
    from pykvm import sandbox
    from pykvm.vhost_user.daemon import start_virtiofsd
    assert sandbox.enabled()
    daemon = start_virtiofsd(str(tmp_path), name="virtio-fs0")
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        device = FsDevice(Frontend.connect(daemon.socket_path, "virtio-fs0"), "t", daemon=daemon)
        daemon.connected()              # as open_fs_devices does: nothing left on disk now
        assert not daemon.directory.exists()
        function = VirtioPciDevice(vm, memory, device,
                                   interrupt_lines=[RecordingLine(24 + i) for i in range(3)])
        try:
            os.kill(daemon.process.pid, 9)
            assert wait_for(lambda: function.status & STATUS_NEEDS_RESET)
            lines = pykvm_warnings(caplog)
            assert len(lines) == 1 and "killed by signal 9" in lines[0], lines
        finally:
            function.close()
            vm.close()
    assert not daemon.directory.exists()


def test_share_is_live_unless_copy_or_virtiofsd_is_missing(tmp_path, monkeypatch):
    from pykvm import share
    from pykvm.vhost_user import daemon
    copies, live = share.parse_shares([f"{tmp_path},copy", f"{tmp_path},ro,tag=src"])
    assert copies == [str(tmp_path)]
    assert live == [FsSpec("src", source=str(tmp_path), read_only=True)]
    said = []
    monkeypatch.setattr(daemon, "virtiofsd_path", lambda: None)
    copies, live = share.parse_shares([str(tmp_path), str(tmp_path)], warn=said.append)
    assert copies == [str(tmp_path)] * 2 and live == []
    assert len(said) == 1 and "read-only copy" in said[0]
    with pytest.raises(ConfigError):
        share.parse_shares([f"{tmp_path},tag=x"])     # a copy has no tag


def test_guest_is_told_where_to_mount_live_shares():
    from pykvm import share
    from pykvm.machine import MachineConfig
    config = MachineConfig(kernel="k", shares=["/copy"],
                           live_shares=[FsSpec("a", source="/x"), FsSpec("b", source="/y",
                                                                          read_only=True)])
    # the copy is /mnt/share (the agent mounts it); live ones come after it
    assert share.virtiofs_cmdline(config) == "pykvm.virtiofs=share1:a,share2:b:ro"
    rooted = MachineConfig(kernel="k", rootfs="/", workdir="/home/me/src")
    assert share.rootfs_cmdline(rooted) == "pykvm.rootfs=pykvm-root pykvm.cwd=pykvm-cwd:/home/me/src"
    assert [s.read_only for s in share.rootfs_shares(rooted)] == [True, False]
    with pytest.raises(ConfigError):
        share.rootfs_cmdline(MachineConfig(kernel="k", rootfs="/", workdir="/a b"))
