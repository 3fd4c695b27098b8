"""User-mode networking without booting Linux: --net user/passt= parsing, the
stream back end's framing against a socketpair (partial reads and writes, empty
and oversized frames from either side, a flood against a peer that does not
read), a real passt answering through the device, and passt's clean-up on every
way pykvm ends (normal exit, SIGTERM, a guest crash).

Tests that start passt run it in a network namespace they create, whose only
uplink is a veth pair with both ends inside it (this host has no dummy links):
no frame leaves the machine.
"""

import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykvm.devices.virtio.device import VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.net import (NET_HDR_SIZE, RECEIVE_QUEUE, TRANSMIT_QUEUE,
                                      VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF, NetDevice)
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from pykvm.net.passt import Forward, Passt, passt_binary
from pykvm.net.plumbing import NetSpec, entered_netns, open_netns
from pykvm.net.stream import MAX_FRAME, StreamWire

from ..conftest import needs_kvm
from ..fakes import wait_for
from ..logs import pykvm_warnings
from .test_net import driven_queues

ROOT = Path(__file__).resolve().parents[2]
GUEST_MAC = bytes.fromhex("525400000001")
PEER_MAC = bytes.fromhex("020000000002")
RX_RING, TX_RING, RX_BUFFERS, TX_BUFFERS = 0x10000, 0x20000, 0x100000, 0x200000
_names = itertools.count()

needs_passt = pytest.mark.skipif(passt_binary() is None, reason="passt is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def frame(payload: bytes, dst: bytes = GUEST_MAC) -> bytes:
    return dst + PEER_MAC + b"\x88\xb5" + payload


def framed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


# --- parsing -------------------------------------------------------------------------------------
def test_user_spec_parses_mac_forwards_and_gateway_mapping():
    spec = NetSpec.parse("user,mac=52:54:00:00:00:07,fwd=tcp:8080:80,fwd=udp:5353:53,map-gw=off")
    assert spec.mode == "user" and spec.mac == bytes.fromhex("525400000007")
    assert spec.forwards == (Forward("tcp", 8080, 80), Forward("udp", 5353, 53))
    assert spec.map_gw is False and spec.passt_socket is None
    assert NetSpec.parse("user") == NetSpec(mode="user")
    assert NetSpec.parse("passt=/run/p.sock").passt_socket == "/run/p.sock"
    assert Forward("tcp", 8080, 80).option() == ["--tcp-ports", "8080:80"]


# --- the device on a stream wire (a socketpair stands in for passt) -------------------------------
@pytest.fixture
def memory():
    with GuestMemory.anonymous(4 << 20) as ram:
        yield ram


class StreamNic:
    """A NetDevice on a StreamWire, one receive and one transmit ring, driven
    synchronously; ``peer`` is the socket's other end (passt's side)."""

    def __init__(self, memory, features=VIRTIO_NET_F_MRG_RXBUF, size=64, *, fd=None, owner=None):
        self.peer = None
        if fd is None:
            ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fd = ours.detach()
        self.wire = StreamWire(fd)
        self.device = NetDevice(self.wire, GUEST_MAC, owner=owner)
        self.kicks = []
        self.device.kick = self.kicks.append
        self.memory = memory
        self.rx, self.rxq, self.tx, self.txq = driven_queues(memory, size)
        self.device.activate(features | VIRTIO_F_VERSION_1)

    def offer(self, count, size=2048, base=RX_BUFFERS):
        for i in range(count):
            self.rx.add_chain([(base + 0x1000 * i, size, True)])

    def receive(self, expected, timeout=3.0):
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            self.device.process_queue(RECEIVE_QUEUE, self.rxq)
            got += self.rx.take_used()
            if len(got) < expected:
                time.sleep(0.005)
        return got

    def transmit(self, data: bytes, address=TX_BUFFERS):
        self.memory.write(address, bytes(NET_HDR_SIZE) + data)
        self.tx.add_chain([(address, NET_HDR_SIZE + len(data), False)])

    def close(self):
        if self.peer is not None:
            self.peer.close()
        self.device.close()
        self.wire.close()


def read_frames(sock: socket.socket, count: int, timeout=3.0) -> list[bytes]:
    """``count`` length-prefixed frames from the stream (exactly: the framing must hold)."""
    sock.settimeout(timeout)
    data, frames = b"", []
    while len(frames) < count:
        while len(data) >= 4 and len(data) >= 4 + struct.unpack_from(">I", data)[0]:
            length = struct.unpack_from(">I", data)[0]
            frames.append(data[4:4 + length])
            data = data[4 + length:]
        if len(frames) < count:
            data += sock.recv(1 << 20)
    assert not data, "bytes after the last whole frame"
    return frames


def test_stream_nic_offers_no_offloads(memory):
    nic = StreamNic(memory)
    assert not nic.device.offered_features & VIRTIO_NET_F_CSUM
    nic.close()


def test_frames_from_the_stream_land_in_guest_buffers_across_partial_reads(memory):
    nic = StreamNic(memory)
    nic.offer(8)
    sent = [frame(bytes([i]) * (50 + 300 * i)) for i in range(4)]
    stream = b"".join(framed(data) for data in sent)
    for i in range(0, len(stream), 7):           # 7-byte pieces: prefixes split too
        nic.peer.send(stream[i:i + 7])
        nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
    used = nic.rx.take_used()
    used += nic.receive(4 - len(used))
    assert [written for _, written in used] == [NET_HDR_SIZE + len(d) for d in sent]
    for i, data in enumerate(sent):
        landed = memory.read(RX_BUFFERS + 0x1000 * i, NET_HDR_SIZE + len(data))
        assert landed[:10] == bytes(10)                             # no offload flags
        assert struct.unpack_from("<H", landed, 10)[0] == 1         # num_buffers
        assert landed[NET_HDR_SIZE:] == data
    nic.close()


def test_empty_short_and_oversized_frames_from_passt_are_skipped_in_step(memory):
    nic = StreamNic(memory)
    nic.offer(8)
    good = [frame(b"first"), frame(b"second"), frame(b"third")]
    nic.peer.sendall(framed(good[0]) + struct.pack(">I", 0) + framed(b"short")
                     + struct.pack(">I", MAX_FRAME + 1) + b"\xee" * (MAX_FRAME + 1)
                     + framed(good[1]))
    # a frame longer than the guest's buffers (but legal on the stream) is dropped
    nic.peer.sendall(framed(frame(b"L" * 3000)) + framed(good[2]))
    used = nic.receive(3)
    assert [written for _, written in used] == [NET_HDR_SIZE + len(d) for d in good]
    for i, data in enumerate(good):
        assert memory.read(RX_BUFFERS + 0x1000 * i + NET_HDR_SIZE, len(data)) == data
    assert nic.wire.stats["rx_empty"] == 1 and nic.wire.stats["rx_malformed"] == 2
    assert nic.device.stats["rx_dropped_too_long"] == 1
    nic.close()


def test_a_frame_spreads_over_mergeable_buffers(memory):
    nic = StreamNic(memory)
    nic.offer(8, size=512)
    data = frame(bytes(range(256)) * 5)
    nic.peer.sendall(framed(data))
    used = nic.receive(3)
    assert [written for _, written in used] == [512, 512, NET_HDR_SIZE + len(data) - 1024]
    landed = b"".join(memory.read(RX_BUFFERS + 0x1000 * i, 512) for i in range(3))
    assert landed[NET_HDR_SIZE:NET_HDR_SIZE + len(data)] == data
    assert struct.unpack_from("<H", landed, 10)[0] == 3
    nic.close()


def test_end_of_stream_stops_receive_with_one_note(memory, caplog):
    nic = StreamNic(memory)
    nic.offer(2)
    nic.peer.close()
    nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
    nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
    assert sum("receive stopped" in line for line in pykvm_warnings(caplog)) == 1
    nic.device.close()


def test_guest_frames_go_out_length_prefixed_and_hostile_ones_are_refused(memory):
    nic = StreamNic(memory)
    good = frame(b"to passt" * 10, dst=PEER_MAC)
    nic.transmit(good, TX_BUFFERS)
    nic.tx.add_chain([(TX_BUFFERS + 0x1000, NET_HDR_SIZE, False)])           # empty frame
    nic.tx.add_chain([(TX_BUFFERS + 0x2000, NET_HDR_SIZE + 10, False)])      # shorter than Ethernet
    nic.tx.add_chain([(TX_BUFFERS + 0x10000, NET_HDR_SIZE + MAX_FRAME + 1, False)])  # too long
    nic.transmit(good, TX_BUFFERS + 0x3000)
    nic.device.process_queue(TRANSMIT_QUEUE, nic.txq)
    assert len(nic.tx.take_used()) == 5
    assert read_frames(nic.peer, 2) == [good, good]
    assert nic.device.stats["tx_frames"] == 2 and nic.device.stats["tx_errors"] == 3
    nic.close()


def test_a_flood_against_a_peer_that_does_not_read_waits_and_keeps_the_framing(memory):
    nic = StreamNic(memory, size=256)
    nic.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = [frame(i.to_bytes(4, "big") * 370, dst=PEER_MAC) for i in range(2000)]
    delivered = []
    started = time.monotonic()
    pending = list(sent)
    while (pending or nic.tx.used_idx() < len(sent)) and time.monotonic() - started < 60:
        room = 256 - (len(sent) - len(pending) - nic.tx.used_idx())
        for _ in range(min(room, len(pending))):
            data = pending.pop(0)
            slot = (len(sent) - len(pending)) % 256
            nic.transmit(data, TX_BUFFERS + 0x1000 * slot)
        nic.device.process_queue(TRANSMIT_QUEUE, nic.txq)   # never blocks
        nic.tx.take_used()
        if nic.device._tx_blocked:
            assert nic.device.wants_more(TRANSMIT_QUEUE) is False
            delivered += drain(nic.peer)                    # the slow reader catches up
            assert wait_for(lambda: TRANSMIT_QUEUE in nic.kicks, timeout=5)
            nic.kicks.clear()
    delivered += drain(nic.peer)
    assert nic.wire.stats["tx_short_writes"] > 0            # the socket did fill up
    assert delivered == sent
    nic.close()


_leftover = {}


def drain(sock: socket.socket) -> list[bytes]:
    """Whole frames readable now; a partial one is kept for the next call."""
    sock.setblocking(False)
    data = _leftover.pop(id(sock), b"")
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    frames = []
    while len(data) >= 4 and len(data) >= 4 + struct.unpack_from(">I", data)[0]:
        length = struct.unpack_from(">I", data)[0]
        frames.append(data[4:4 + length])
        data = data[4 + length:]
    _leftover[id(sock)] = data
    return frames


# --- a real passt ---------------------------------------------------------------------------------
NS_ADDRESS, NS_GATEWAY = "10.77.0.2", "10.77.0.1"


@pytest.fixture
def user_netns():
    """A throwaway namespace like a laptop's as passt sees it: an uplink (a veth pair,
    both ends inside) with an address and a default route via a gateway that does not
    exist. This test's thread runs inside it; passt, as its child, too."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"pykvm-u{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (["link", "add", "up0", "type", "veth", "peer", "name", "up1"],
                        ["link", "set", "lo", "up"], ["link", "set", "up0", "up"],
                        ["link", "set", "up1", "up"],
                        ["addr", "add", f"{NS_ADDRESS}/24", "dev", "up0"],
                        ["route", "add", "default", "via", NS_GATEWAY]):
            subprocess.run(["ip", "-n", name, *command], check=True)
        fd = open_netns(name)
        try:
            with entered_netns(fd):
                yield name
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def arp_request(target_ip: str, sender_ip: str) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC,
                      socket.inet_aton(sender_ip), bytes(6), socket.inet_aton(target_ip))
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + arp


def exchange_arp(memory, fd: int, owner=None) -> bytes:
    """The guest asks for the gateway's MAC through a StreamNic on ``fd``; passt's answer."""
    nic = StreamNic(memory, size=16, fd=fd, owner=owner)
    try:
        nic.offer(8)
        nic.transmit(arp_request(NS_GATEWAY, NS_ADDRESS))
        nic.device.process_queue(TRANSMIT_QUEUE, nic.txq)
        used = nic.receive(1, timeout=10)
        assert used, "passt did not answer"
        return memory.read(RX_BUFFERS + NET_HDR_SIZE, used[0][1] - NET_HDR_SIZE)
    finally:
        nic.close()


@needs_passt
def test_passt_answers_through_the_device_and_is_gone_after_close(memory, user_netns):
    passt = Passt()
    directory, pid = passt.directory, passt.pid
    assert Path(f"/proc/{pid}").exists() and Path(directory, "passt.pid").exists()
    reply = exchange_arp(memory, passt.take_fd(), owner=passt)      # closes the NIC and passt
    assert reply[:6] == GUEST_MAC and reply[12:14] == b"\x08\x06"
    assert struct.unpack_from("!H", reply, 20)[0] == 2                  # an ARP reply
    assert socket.inet_ntoa(reply[28:32]) == NS_GATEWAY
    assert not Path(f"/proc/{pid}").exists() and not Path(directory).exists()


@needs_passt
def test_passt_socket_attaches_a_passt_the_user_started(memory, user_netns):
    import shutil
    import tempfile

    from pykvm.net.passt import connect_socket, unprivileged_ids

    directory = Path(tempfile.mkdtemp(prefix="pykvm-test-passt-"))   # tmp_path's parents: 0700
    os.chown(directory, *unprivileged_ids())     # started as root, passt runs as nobody
    path = directory / "passt.socket"
    passt = subprocess.Popen(["passt", "--foreground", "--quiet", "--one-off", "--socket",
                              str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        spec = NetSpec.parse(f"passt={path}")
        fds = []

        def connected():     # passt binds the path a moment before it listens
            try:
                fds.append(connect_socket(spec.passt_socket))
            except ConfigError:
                return False
            return True

        assert wait_for(connected, timeout=10)
        reply = exchange_arp(memory, fds[0])
        assert reply[:6] == GUEST_MAC and struct.unpack_from("!H", reply, 20)[0] == 2
        assert passt.wait(timeout=10) == 0         # --one-off: our close ended it
        with pytest.raises(ConfigError, match="cannot connect"):
            connect_socket(str(path))
    finally:
        if passt.poll() is None:
            passt.kill()
            passt.wait()
        shutil.rmtree(directory)


@needs_passt
def test_passt_gets_the_forwards_and_the_gateway_mapping_asked_for(user_netns):
    passt = Passt((Forward("tcp", 18081, 81), Forward("udp", 18082, 82)), map_gw=False)
    try:
        argv = Path(f"/proc/{passt.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--no-map-gw" in argv and b"--one-off" in argv
        assert argv[argv.index(b"--tcp-ports") + 1] == b"18081:81"
        assert argv[argv.index(b"--udp-ports") + 1] == b"18082:82"
        with socket.socket() as probe:             # bound before passt said it was ready
            assert probe.connect_ex(("127.0.0.1", 18081)) == 0
    finally:
        passt.close()


@needs_passt
def test_passt_that_cannot_start_is_a_one_line_config_error(user_netns):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        before = set(os.listdir("/tmp"))
        with pytest.raises(ConfigError, match="passt failed to start") as error:
            Passt((Forward("tcp", port, 80),))
    assert "\n" not in str(error.value)
    assert not {n for n in set(os.listdir("/tmp")) - before if n.startswith("pykvm-passt-")}


def test_missing_passt_is_a_config_error(monkeypatch):
    import pykvm.net.passt as module
    monkeypatch.setattr(module, "passt_binary", lambda: None)
    with pytest.raises(ConfigError, match="apt-get install passt"):
        Passt()


# --- the CLI: passt and its directory are gone however pykvm ends ---------------------------------
SPIN = b"\xeb\xfe"                              # jmp $
EXIT_0 = b"\xb0\x00\xe6\xf4\xf4"                # mov al, 0; out 0xf4, al; hlt (real mode)
CRASH = b"\x0f\x0b"                             # ud2 in long mode without an IDT


def passt_in(netns_inode: int) -> set[int]:
    """passt processes in the namespace (a leaked one would have been reparented)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and "passt" in (entry / "comm").read_text()
                    and os.stat(entry / "ns" / "net").st_ino == netns_inode):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def passt_directories() -> set[str]:
    import tempfile
    root = Path(tempfile.gettempdir())
    return {str(p) for p in root.glob("pykvm-passt-*")}


@needs_kvm
@needs_passt
@pytest.mark.parametrize("how", ["exit", "sigterm", "crash"])
def test_cli_stops_passt_and_removes_its_directory(tmp_path, user_netns, how):
    import threading

    image = {"exit": EXIT_0, "sigterm": SPIN, "crash": CRASH}[how]
    flat = tmp_path / "guest.bin"
    flat.write_bytes(image)
    extra = ["--entry", "long"] if how == "crash" else []
    inode = os.stat("/proc/thread-self/ns/net").st_ino
    seen, directories, done = set(), set(), threading.Event()
    before = passt_directories()

    def watch():            # a flat guest ends within a second: look while it runs
        while not done.is_set():
            seen.update(passt_in(inode))
            directories.update(passt_directories() - before)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    process = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "run", "--flat", str(flat), *extra,
         "--net", "user,fwd=tcp:18080:80", "--net", "user"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher.start()
    try:
        if how == "sigterm":
            assert wait_for(lambda: len(seen) == 2 or process.poll() is not None, timeout=60)
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        done.set()
        watcher.join()
        if process.poll() is None:
            process.kill()
    expected = {"exit": 0, "sigterm": 128 + signal.SIGTERM, "crash": 3}[how]
    assert process.returncode == expected, stderr
    assert "Traceback" not in stderr
    assert len(seen) == 2 and len(directories) == 2, "pykvm did not start two passts"
    assert not passt_in(inode)
    assert not directories & passt_directories()


def test_check_says_whether_user_networking_is_available(monkeypatch):
    import pykvm.net.passt as module
    assert (module.user_networking_status() is None) == (passt_binary() is not None)
    monkeypatch.setattr(module, "passt_binary", lambda: None)
    assert "apt-get install passt" in module.user_networking_status()


def test_the_worker_thread_keeps_serving_both_queues_through_hostile_traffic(memory):
    """The whole transport (queue worker, read and write watchers, MSI-X): a guest
    flood into a peer that stops reading, and garbage lengths from the peer, leave
    the device answering, and every frame arrives whole once the peer reads."""
    from pykvm.devices.pci.msix import CONTROL_ENABLE
    from pykvm.devices.virtio.driver import PciDriver, RecordingLine, StandInVm
    from pykvm.devices.virtio.pci import VirtioPciDevice

    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    vm = StandInVm(memory)
    device = NetDevice(StreamWire(ours.detach()), GUEST_MAC, name="virtio-net0")
    function = VirtioPciDevice(vm, memory, device, interrupt_lines=[RecordingLine(24 + i)
                                                                    for i in range(3)])
    driver = PciDriver(function)
    assert driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) & 8
    function.config.write(function.msix.offset + 2, 2, CONTROL_ENABLE)
    rx, tx = DriverRing(memory, RX_RING, 256), DriverRing(memory, TX_RING, 256)
    driver.setup_queue(RECEIVE_QUEUE, rx, vector=0)
    driver.setup_queue(TRANSMIT_QUEUE, tx, vector=1)
    driver.driver_ok()
    try:
        sent = [frame(i.to_bytes(2, "big") * 700, dst=PEER_MAC) for i in range(256)]
        for i, data in enumerate(sent):
            memory.write(TX_BUFFERS + 0x1000 * i, bytes(NET_HDR_SIZE) + data)
            tx.add_chain([(TX_BUFFERS + 0x1000 * i, NET_HDR_SIZE + len(data), False)])
        driver.notify(TRANSMIT_QUEUE)
        time.sleep(0.2)                          # the peer reads nothing yet: transmit waits
        assert tx.used_idx() < 256 and device.wire.stats["tx_short_writes"] >= 1
        for i in range(8):                       # receive still works meanwhile
            rx.add_chain([(RX_BUFFERS + 0x1000 * i, 2048, True)])
        driver.notify(RECEIVE_QUEUE)
        good = frame(b"before the garbage")
        peer.setblocking(True)
        peer.sendall(framed(good) + struct.pack(">I", 0) + struct.pack(">I", 1 << 31)
                     + framed(frame(b"inside the 2 GiB")) + b"\0" * 4096)
        assert wait_for(lambda: rx.used_idx() == 1)
        assert memory.read(RX_BUFFERS + NET_HDR_SIZE, len(good)) == good
        time.sleep(0.2)
        assert rx.used_idx() == 1                # 2 GiB announced: skipped as it comes, not held
        got = drain(peer)
        deadline = time.monotonic() + 30
        while len(got) < 256 and time.monotonic() < deadline:
            got += drain(peer)
            time.sleep(0.01)
        assert got == sent and wait_for(lambda: tx.used_idx() == 256)
        assert device.wire.stats["rx_empty"] == 1 and device.wire.stats["rx_malformed"] == 1
    finally:
        peer.close()
        function.close()
        vm.close()


pytest_plugins = ["pytester"]
GUEST = __import__("pykvm.machine").machine.default_guest_dir()   # before pytester moves HOME


@needs_kvm
@pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built")
def test_the_pytest_plugins_net_option_reaches_the_machine(pytester):
    """--pykvm-net gives linux_vm its NIC: a bad spec fails the test before any boot."""
    pytester.makepyfile(test_sample="def test_boot(linux_vm):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--pykvm-net", "user=oops", "-rA",
                                "--pykvm-kernel", str(GUEST / "vmlinux"),
                                "--pykvm-initrd", str(GUEST / "initramfs.cpio"))
    result.stdout.fnmatch_lines(["*user takes no value*"])
    assert result.ret != 0
