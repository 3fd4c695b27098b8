"""virtio-net over a TAP, without booting a guest: --net parsing and default MACs,
TAP and bridge plumbing with exact clean-up, the device's receive and transmit
paths with an in-memory guest RAM and a real TAP (synchronously, then through
the transport's worker thread with MSI-X), and the CLI's clean-up on normal
exit, SIGTERM, SIGINT and a guest crash.

Every test that touches the network runs in a network namespace it creates
(the ``netns`` fixture moves only the test's thread there); no frame leaves it.
"""

import contextlib
import itertools
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pykvm.devices.virtio.device import STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.net import (NET_HDR_SIZE, RECEIVE_QUEUE, TRANSMIT_QUEUE, TUN_F_CSUM,
                                      TUN_F_TSO4, TUN_F_TSO6, VIRTIO_NET_F_CSUM,
                                      VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                                      VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_MAC,
                                      VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
                                      VIRTIO_NET_F_STATUS, NetDevice, open_net_devices,
                                      tun_offload)
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.queue import Virtqueue, VirtqueueError
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from pykvm.net.plumbing import (NetSpec, default_mac, entered_netns, format_mac, machine_key,
                                open_netns, open_nic, parse_cidr, parse_mac)
from pykvm.net.tap import Tap

from ..conftest import needs_kvm
from ..fakes import wait_for
from ..logs import pykvm_warnings

ROOT = Path(__file__).resolve().parents[2]
ETHERTYPE = 0x88B5          # IEEE local experimental: nothing in the kernel answers it
GUEST_MAC = bytes.fromhex("525400000001")
HOST_MAC = bytes.fromhex("020000000002")
RX_RING, TX_RING, RX_BUFFERS, TX_BUFFERS = 0x10000, 0x20000, 0x100000, 0x200000

can_plumb = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="TAPs and network namespaces need root and /dev/net/tun")
_names = itertools.count()


# --- parsing (no privileges) ---------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("tap", NetSpec()),
    ("tap=tap7", NetSpec(tap="tap7")),
    ("tap=t0,mac=52:54:00:12:34:56,bridge=br0,host-ip=10.0.2.2/24,netns=vm",
     NetSpec(tap="t0", mac=bytes.fromhex("525400123456"), bridge="br0",
             host_ip=parse_cidr("10.0.2.2/24"), netns="vm")),
    ("tap,mac=02-00-00-AA-bb-01", NetSpec(mac=bytes.fromhex("020000aabb01"))),
    ("tap,host-ip=fd00::2/64", NetSpec(host_ip=parse_cidr("fd00::2/64"))),
])
def test_net_spec_parse(text, expected):
    assert NetSpec.parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("slirp", "unknown backend"),
    ("tap=", "empty TAP name"),
    ("tap=much-too-long-name0", "not a valid interface name"),
    ("tap=a/b", "not a valid interface name"),
    ("tap,mac=52:54:00:12:34", "malformed"),
    ("tap,mac=52:54:00:12:34:zz", "malformed"),
    ("tap,mac=525400123456", "malformed"),
    ("tap,mac=01:00:5e:00:00:01", "multicast"),
    ("tap,mac=00:00:00:00:00:00", "not a valid station"),
    ("tap,host-ip=10.0.2.2", "prefix length"),
    ("tap,host-ip=10.0.2.300/24", "not an address/prefix"),
    ("tap,host-ip=10.0.2.2/33", "not an address/prefix"),
    ("tap,host-ip=224.0.0.1/4", "not a host address"),
    ("tap,bridge=", "needs a value"),
    ("tap,speed=10", "unknown option"),
    ("tap,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57", "given twice"),
    ("tap,netns=../x", "not a namespace name"),
    ("user=x", "takes no value"),
    ("passt=", "passt=SOCKET"),
    ("user,bridge=br0", "no option 'bridge'"),
    ("passt=/s,fwd=tcp:1:2", "no option 'fwd'"),
    ("user,fwd=tcp:80", "fwd=tcp:HOSTPORT:GUESTPORT"),
    ("user,fwd=sctp:1:2", "fwd=tcp:HOSTPORT:GUESTPORT"),
    ("user,fwd=tcp:0:80", "not a port"),
    ("user,fwd=tcp:70000:80", "not a port"),
    ("user,fwd=tcp:8080:80,fwd=tcp:8080:81", "forwarded twice"),
    ("user,mac=52:54:00:00:00:01,mac=52:54:00:00:00:02", "given twice"),
    ("user,map-gw=maybe", "on or off"),
])
def test_net_spec_errors_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=message) as raised:
        NetSpec.parse(text)
    assert "\n" not in str(raised.value)


def test_parse_mac_round_trip():
    assert format_mac(parse_mac("52:54:00:AB:cd:0F")) == "52:54:00:ab:cd:0f"


def test_default_mac_is_stable_local_unicast_and_per_nic():
    macs = [default_mac("machine-a", index) for index in range(4)]
    assert macs == [default_mac("machine-a", index) for index in range(4)]   # every run
    assert len(set(macs)) == 4 and default_mac("machine-b", 0) != macs[0]
    for mac in macs:
        assert len(mac) == 6 and mac[0] & 0x02 and not mac[0] & 0x01


def test_machine_key_ignores_memory_but_not_the_guest():
    from pykvm.machine import MachineConfig

    nets = [NetSpec(tap="t0")]
    a = MachineConfig(kernel=Path("/k"), nets=nets, mem_size=256 << 20)
    b = MachineConfig(kernel=Path("/k"), nets=nets, mem_size=512 << 20, cpus=2)
    c = MachineConfig(kernel=Path("/other"), nets=nets)
    assert machine_key(a) == machine_key(b) != machine_key(c)


def test_cli_bad_net_is_one_line(tmp_path):
    flat = tmp_path / "spin.bin"
    flat.write_bytes(b"\xeb\xfe")
    for option, message in (("tap,mac=zz", "malformed"), ("tap,host-ip=1.2.3.4", "prefix"),
                            ("bridge=br0", "unknown backend")):
        done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--flat", str(flat),
                               "--net", option], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


def test_offload_flags_follow_what_the_guest_accepted():
    assert tun_offload(0) == 0
    assert tun_offload(VIRTIO_NET_F_GUEST_TSO4) == 0          # TSO needs GUEST_CSUM
    assert tun_offload(VIRTIO_NET_F_GUEST_CSUM) == TUN_F_CSUM
    assert tun_offload(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4
                       | VIRTIO_NET_F_GUEST_TSO6) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6


# --- a network namespace per test ----------------------------------------------------------------
def ip(*args, check=True) -> str:
    """iproute2 in the test's namespace (the child inherits the thread's namespace)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check).stdout


def link_state(name: str) -> str:
    """`ip -d link show` without the qdisc (the kernel attaches its default qdisc the
    first time a link goes up, and keeps it: not a setting pykvm makes)."""
    return re.sub(r"qdisc \S+ ", "", ip("-d", "link", "show", name))


def link_names() -> set[str]:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


@pytest.fixture
def netns():
    """A fresh network namespace, with this test's thread inside it; removed after."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("TAPs and network namespaces need root and /dev/net/tun")
    from pyroute2 import netns as pyroute_netns

    name = f"pykvm-t{os.getpid()}-{next(_names)}"
    pyroute_netns.create(name)
    fd = open_netns(name)
    try:
        with entered_netns(fd):
            for path in ("all", "default"):   # no IPv6 chatter on the TAPs
                Path(f"/proc/sys/net/ipv6/conf/{path}/disable_ipv6").write_text("1")
            yield name
    finally:
        os.close(fd)
        pyroute_netns.remove(name)


def packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    sock.bind((ifname, 0))
    sock.settimeout(2)
    return sock


def frame(payload: bytes, dst: bytes = GUEST_MAC) -> bytes:
    return dst + HOST_MAC + struct.pack("!H", ETHERTYPE) + payload


def receive_ours(sock: socket.socket, count: int) -> list[bytes]:
    """Frames the TAP's host side received (PACKET_HOST etc.), not the ones it sent."""
    frames = []
    while len(frames) < count:
        data, address = sock.recvfrom(65536)
        if address[2] != socket.PACKET_OUTGOING:
            frames.append(data)
    return frames


# --- TAP and plumbing ----------------------------------------------------------------------------
def test_tap_is_created_with_a_vnet_header_and_goes_with_its_fd(netns):
    tap = Tap("ptest0")
    assert tap.created and tap.name == "ptest0" and "ptest0" in link_names()
    assert "vnet_hdr on" in ip("-d", "link", "show", "ptest0")
    tap.close()
    assert "ptest0" not in link_names()


def test_plain_tap_is_set_up_without_netlink(netns):
    """`--net tap`: a new TAP, up, with its MTU, through two ioctls; pyroute2 (19 MiB
    resident for the VM's life, bench/memory.py) is not imported by set-up or clean-up."""
    script = textwrap.dedent("""
        import os, sys
        from pykvm.net.plumbing import NetSpec, open_nic, open_netns, entered_netns
        with entered_netns(open_netns(sys.argv[1])):
            backend = open_nic(NetSpec.parse("tap"), bytes.fromhex("525400123456"))
            print(backend.tap.name, backend.mtu, flush=True)
            sys.stdin.readline()
            backend.close()
            print("pyroute2" in " ".join(sys.modules), flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, netns], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        name, mtu = child.stdout.readline().split()
        assert int(mtu) == 1500 and name.startswith("pykvm")
        shown = ip("link", "show", name)
        assert "state" in shown and ",UP" in shown
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
    assert child.stdout.readline().strip() == "False"
    assert child.wait(timeout=30) == 0
    assert name not in link_names()


def test_tap_name_template_is_filled_in_by_the_kernel(netns):
    with Tap() as first, Tap() as second:
        assert first.name.startswith("pykvm") and second.name.startswith("pykvm")
        assert first.name != second.name


def test_plumbing_creates_bridge_and_address_and_removes_them(netns):
    spec = NetSpec.parse("tap=ptest1,bridge=pbr0,host-ip=10.7.0.1/24")
    backend = open_nic(spec, GUEST_MAC)
    assert backend.tap.created and backend.bridge_created
    shown = ip("-d", "link", "show", "ptest1")
    assert "master pbr0" in shown and "UP" in shown
    assert "10.7.0.1/24" in ip("addr", "show", "pbr0")
    assert "UP" in ip("link", "show", "pbr0")
    backend.close()
    backend.close()                                   # twice is fine
    assert link_names() == {"lo"}


def test_address_goes_on_the_tap_without_a_bridge(netns):
    with open_nic(NetSpec.parse("tap=ptest2,host-ip=10.8.0.1/24"), GUEST_MAC):
        assert "10.8.0.1/24" in ip("addr", "show", "ptest2")
    assert link_names() == {"lo"}


def test_pre_existing_tap_and_bridge_are_left_as_they_were(netns):
    ip("tuntap", "add", "dev", "ptest3", "mode", "tap")
    ip("link", "add", "pbr3", "type", "bridge")
    ip("addr", "add", "10.9.0.1/24", "dev", "pbr3")
    before_tap = link_state("ptest3")
    backend = open_nic(NetSpec.parse("tap=ptest3,bridge=pbr3,host-ip=10.9.0.1/24"), GUEST_MAC)
    assert not backend.tap.created and not backend.bridge_created
    assert "master pbr3" in ip("link", "show", "ptest3")
    backend.close()
    assert link_names() == {"lo", "ptest3", "pbr3"}
    assert link_state("ptest3") == before_tap   # down, no master, vnet_hdr off
    assert "10.9.0.1/24" in ip("addr", "show", "pbr3")          # it was there before: kept
    assert "state DOWN" in ip("link", "show", "pbr3")           # brought up for us, down again


def test_pre_existing_tap_loses_only_the_address_pykvm_added(netns):
    ip("tuntap", "add", "dev", "ptest4", "mode", "tap")
    ip("link", "set", "ptest4", "up")
    with open_nic(NetSpec.parse("tap=ptest4,host-ip=10.10.0.1/24"), GUEST_MAC) as backend:
        assert not backend.tap.created
        assert "10.10.0.1/24" in ip("addr", "show", "ptest4")
    shown = ip("addr", "show", "ptest4")
    assert "10.10.0.1" not in shown and "UP" in shown             # it was up: still up


def test_created_bridge_stays_while_another_port_uses_it(netns):
    first = open_nic(NetSpec.parse("tap=ptest5,bridge=pbr5"), GUEST_MAC)
    second = open_nic(NetSpec.parse("tap=ptest6,bridge=pbr5"), default_mac("x", 1))
    assert first.bridge_created and not second.bridge_created
    first.close()
    assert "pbr5" in link_names()
    second.close()
    assert "pbr5" in link_names()      # the second did not create it: not its to delete
    ip("link", "del", "pbr5")


@pytest.mark.parametrize("setup, option, message", [
    (("link", "add", "pbr7", "type", "bridge"), "tap=pbr7", "in use by a non-TAP link (bridge)"),
    (None, "tap=lo", "in use by a non-TAP link (loopback)"),
    (("tuntap", "add", "dev", "ptun7", "mode", "tun"), "tap=ptun7", "non-TAP link (tun)"),
    (None, "tap=ptest7,bridge=lo", "lo exists and is a loopback link, not a bridge"),
    (None, "tap,netns=pykvm-no-such-ns", "does not exist"),
])
def test_bad_plumbing_input_is_a_config_error_and_leaves_nothing(netns, setup, option, message):
    if setup:
        ip(*setup)
    before = link_names()
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        open_nic(NetSpec.parse(option), GUEST_MAC)
    assert "\n" not in str(raised.value)
    assert link_names() == before


def test_no_permission_for_dev_net_tun_is_one_line():
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:   # a child that is not root any more tries to open a TAP
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                Tap("x0")
                message = "opened?!"
            except Exception as error:   # noqa: BLE001
                message = f"{type(error).__name__}: {error}"
            os.write(write_end, message.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert message.startswith("TapError: no permission to open /dev/net/tun"), message
    assert "\n" not in message


def test_tap_in_a_named_namespace(netns):
    from pyroute2 import netns as pyroute_netns

    other = f"{netns}-b"
    pyroute_netns.create(other)
    try:
        with open_nic(NetSpec.parse(f"tap=ptest8,host-ip=10.11.0.1/24,netns={other}"),
                      GUEST_MAC):
            assert "ptest8" not in link_names()
            shown = subprocess.run(["ip", "netns", "exec", other, "ip", "addr"],
                                   capture_output=True, text=True).stdout
            assert "ptest8" in shown and "10.11.0.1/24" in shown
        shown = subprocess.run(["ip", "netns", "exec", other, "ip", "link"],
                               capture_output=True, text=True).stdout
        assert "ptest8" not in shown
    finally:
        pyroute_netns.remove(other)


# --- the device, driven synchronously ----------------------------------------------------------
@pytest.fixture
def memory():
    with GuestMemory.anonymous(4 << 20) as ram:
        yield ram


def driven_queues(memory, size: int):
    """A receive and a transmit ring the test drives as the driver, each with the
    device's Virtqueue on it: (rx ring, rx queue, tx ring, tx queue)."""
    rings = DriverRing(memory, RX_RING, size), DriverRing(memory, TX_RING, size)
    queues = Virtqueue(memory, size), Virtqueue(memory, size)
    for ring, queue in zip(rings, queues):
        queue.desc_addr, queue.avail_addr, queue.used_addr = \
            ring.desc_addr, ring.avail_addr, ring.used_addr
        queue.activate(indirect=True, event_idx=False)
    return rings[0], queues[0], rings[1], queues[1]


class Nic:
    """A NetDevice on a real TAP with one receive and one transmit ring."""

    def __init__(self, memory, features, *, size=16, name="pnic0"):
        self.memory = memory
        self.backend = open_nic(NetSpec(tap=name), GUEST_MAC)
        self.device = NetDevice(self.backend.tap, GUEST_MAC, owner=self.backend)
        self.device.kick = lambda index: None
        self.rx, self.rxq, self.tx, self.txq = driven_queues(memory, size)
        self.device.activate(features | VIRTIO_F_VERSION_1)
        self.sock = packet_socket(name)

    def receive(self, expected: int, timeout=2.0):
        """Run the receive queue until ``expected`` used entries came back."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            self.device.process_queue(RECEIVE_QUEUE, self.rxq)
            got += self.rx.take_used()
            time.sleep(0.005)
        return got

    def close(self):
        self.sock.close()
        self.device.close()


def test_config_space_has_mac_link_up_and_mtu(memory, netns):
    nic = Nic(memory, 0)
    config = nic.device.config_bytes()
    assert config[:6] == GUEST_MAC
    assert struct.unpack_from("<HHH", config, 6) == (1, 1, 1500)
    offered = nic.device.offered_features
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
                VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_F_VERSION_1):
        assert offered & bit
    nic.close()


def test_transmit_writes_header_and_frame_to_the_tap(memory, netns):
    nic = Nic(memory, 0)
    sent = [frame(bytes([i]) * (60 + 100 * i)) for i in range(3)]
    address = TX_BUFFERS
    for data in sent:
        memory.write(address, bytes(NET_HDR_SIZE))
        memory.write(address + NET_HDR_SIZE, data)
        # header and frame in separate descriptors, the frame split once more
        nic.tx.add_chain([(address, NET_HDR_SIZE, False),
                          (address + NET_HDR_SIZE, 20, False),
                          (address + NET_HDR_SIZE + 20, len(data) - 20, False)])
        address += 0x1000
    nic.device.process_queue(TRANSMIT_QUEUE, nic.txq)
    assert [written for _, written in nic.tx.take_used()] == [0, 0, 0]
    assert receive_ours(nic.sock, 3) == sent
    assert nic.device.stats["tx_frames"] == 3
    nic.close()


def test_transmit_of_a_chain_shorter_than_the_header_is_dropped(memory, netns):
    nic = Nic(memory, 0)
    nic.tx.add_chain([(TX_BUFFERS, 6, False)])
    nic.device.process_queue(TRANSMIT_QUEUE, nic.txq)
    assert nic.tx.take_used() == [(0, 0)] and nic.device.stats["tx_malformed"] == 1
    nic.close()


def test_receive_lands_in_guest_buffers_with_num_buffers(memory, netns):
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF)
    for i in range(4):
        nic.rx.add_chain([(RX_BUFFERS + 0x1000 * i, 2048, True)])
    sent = [frame(b"hello" * 20), frame(b"x" * 1400)]
    for data in sent:
        nic.sock.send(data)
    used = nic.receive(2)
    assert [written for _, written in used] == [NET_HDR_SIZE + len(d) for d in sent]
    for i, data in enumerate(sent):
        header = memory.read(RX_BUFFERS + 0x1000 * i, NET_HDR_SIZE)
        assert struct.unpack_from("<H", header, 10)[0] == 1          # num_buffers
        assert memory.read(RX_BUFFERS + 0x1000 * i + NET_HDR_SIZE, len(data)) == data
    assert nic.device.stats["rx_frames"] == 2
    nic.close()


def test_mergeable_frame_spreads_over_several_buffers(memory, netns):
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF)
    for i in range(8):
        nic.rx.add_chain([(RX_BUFFERS + 0x1000 * i, 512, True)])
    data = frame(bytes(range(256)) * 5)                              # 1294 bytes
    nic.sock.send(data)
    used = nic.receive(3)
    assert [written for _, written in used] == [512, 512, NET_HDR_SIZE + len(data) - 1024]
    assert struct.unpack_from("<H", memory.read(RX_BUFFERS, NET_HDR_SIZE), 10)[0] == 3
    landed = b"".join(memory.read(RX_BUFFERS + 0x1000 * i, 512) for i in range(3))
    assert landed[NET_HDR_SIZE:NET_HDR_SIZE + len(data)] == data
    nic.close()


def test_without_mergeable_buffers_a_frame_takes_one_chain(memory, netns):
    nic = Nic(memory, 0)
    # one chain of header + two data pieces, as Linux's "big packets" layout does
    nic.rx.add_chain([(RX_BUFFERS, NET_HDR_SIZE, True), (RX_BUFFERS + 0x1000, 700, True),
                      (RX_BUFFERS + 0x2000, 1000, True)])
    data = frame(b"y" * 1000)
    nic.sock.send(data)
    assert [written for _, written in nic.receive(1)] == [NET_HDR_SIZE + len(data)]
    landed = memory.read(RX_BUFFERS + 0x1000, 700) + memory.read(RX_BUFFERS + 0x2000, 1000)
    assert landed[:len(data)] == data
    assert struct.unpack_from("<H", memory.read(RX_BUFFERS, NET_HDR_SIZE), 10)[0] == 1
    nic.close()


def test_too_long_frame_is_dropped_and_its_buffer_reused(memory, netns):
    nic = Nic(memory, 0)
    nic.rx.add_chain([(RX_BUFFERS, 200, True)])
    nic.sock.send(frame(b"z" * 500))
    small = frame(b"ok")
    nic.sock.send(small)
    used = nic.receive(1)
    assert [written for _, written in used] == [NET_HDR_SIZE + len(small)]
    assert memory.read(RX_BUFFERS + NET_HDR_SIZE, len(small)) == small
    assert nic.device.stats["rx_dropped_too_long"] == 1
    nic.close()


def test_a_frame_that_fills_a_buffer_longer_than_the_mtu_allows_is_dropped(memory, netns):
    # One buffer longer than any MTU-sized frame takes the per-frame fast path
    # (net_ring.receive_run): one read() per frame, no spare byte, so a frame that
    # fills the buffer may have been cut by the kernel: dropped as too long (the
    # host raised the TAP's MTU past the guest's), and the buffer reused.
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF)
    ip("link", "set", "pnic0", "mtu", "4000")
    nic.rx.add_chain([(RX_BUFFERS, 2048, True)])
    nic.sock.send(frame(b"f" * (2048 - NET_HDR_SIZE - 14)))         # fills it exactly
    nic.sock.send(frame(b"L" * 3000))                                # cut to 2048
    small = frame(b"ok" * 40)
    nic.sock.send(small)
    assert nic.receive(1) == [(0, NET_HDR_SIZE + len(small))]
    assert memory.read(RX_BUFFERS + NET_HDR_SIZE, len(small)) == small
    assert struct.unpack_from("<H", memory.read(RX_BUFFERS, NET_HDR_SIZE), 10)[0] == 1
    assert nic.device.stats["rx_dropped_too_long"] == 2
    assert nic.device.stats["rx_frames"] == 1
    nic.close()


def test_frames_wait_in_the_tap_until_the_guest_offers_buffers(memory, netns):
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF)
    data = frame(b"later")
    nic.sock.send(data)
    nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
    assert nic.device.wants_more(RECEIVE_QUEUE)
    assert nic.rx.take_used() == []
    nic.rx.add_chain([(RX_BUFFERS, 2048, True)])
    assert [written for _, written in nic.receive(1)] == [NET_HDR_SIZE + len(data)]
    nic.close()


@pytest.mark.parametrize("buffers, message", [
    ([(RX_BUFFERS, 64, False), (RX_BUFFERS + 64, 2048, True)], "device-readable"),
    ([(RX_BUFFERS, 8, True)], "cannot hold"),
])
def test_hostile_receive_chains_are_virtqueue_errors(memory, netns, buffers, message):
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF)
    nic.rx.add_chain(buffers)
    with pytest.raises(VirtqueueError, match=message):
        nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
    nic.close()


def test_receive_chains_beyond_iov_max_cost_frames_not_the_nic(memory, netns):
    # Seven indirect chains of 250 one-byte buffers: together more iovecs than one
    # readv() takes (IOV_MAX 1024) before they hold a largest frame. readv() failed
    # with EINVAL and receive stopped for the VM's lifetime.
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF, size=256)
    tables = 0x300000
    for chain in range(7):
        buffers = [(RX_BUFFERS + 250 * chain + i, 1, True) for i in range(250)]
        nic.rx.add_indirect(tables + 0x1000 * chain, buffers)
    small = [frame(b"a"), frame(b"b")]
    for data in small:
        nic.sock.send(data)
    used = nic.receive(2)
    assert len(used) == 2, nic.device.stats
    assert sum(written for _, written in used) == sum(NET_HDR_SIZE + len(d) for d in small)
    landed = memory.read(RX_BUFFERS, sum(written for _, written in used))
    assert landed[NET_HDR_SIZE:NET_HDR_SIZE + len(small[0])] == small[0]
    nic.close()


def test_reset_gives_a_failed_tap_read_another_chance(memory, netns):
    nic = Nic(memory, VIRTIO_NET_F_MRG_RXBUF)
    saved = os.dup(nic.device.fd)
    unreadable = os.open("/dev/null", os.O_WRONLY)
    try:
        os.dup2(unreadable, nic.device.fd)           # the backend fails a read: EBADF
        nic.rx.add_chain([(RX_BUFFERS, 2048, True)])
        nic.device.process_queue(RECEIVE_QUEUE, nic.rxq)
        assert nic.rx.take_used() == []
    finally:
        os.dup2(saved, nic.device.fd)                # ... and is fine again
        os.close(saved)
        os.close(unreadable)
    nic.device.reset()                               # the driver starts over
    nic.device.activate(VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_VERSION_1)
    nic.rx.add_chain([(RX_BUFFERS + 0x1000, 2048, True)])
    data = frame(b"after reset")
    nic.sock.send(data)
    assert [written for _, written in nic.receive(1)] == [NET_HDR_SIZE + len(data)]
    nic.close()


def test_transmit_of_a_chain_longer_than_any_frame_is_dropped(memory, netns):
    nic = Nic(memory, 0)
    nic.tx.add_chain([(0, 2 << 20, False)])           # 2 MiB: no frame is that long
    nic.device.process_queue(TRANSMIT_QUEUE, nic.txq)
    assert nic.tx.take_used() == [(0, 0)] and nic.device.stats["tx_malformed"] == 1
    nic.close()


def test_guest_offloads_reach_the_tap_and_reset_clears_them(memory, netns):
    from pyroute2.ethtool import Ethtool

    def tso():   # the TAP's netdev features, as the kernel reports them
        with contextlib.closing(Ethtool()) as ethtool:
            features = ethtool.get_features("pnic0").features
        return features["tx-tcp-segmentation"].enable, features["tx-checksum-ip-generic"].enable

    nic = Nic(memory, VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MRG_RXBUF)
    assert nic.backend.tap.offload == TUN_F_CSUM | TUN_F_TSO4
    assert tso() == (True, True)
    nic.device.reset()
    assert nic.backend.tap.offload == 0 and tso() == (False, False)
    nic.close()


# --- the whole transport: worker thread, TAP watcher, MSI-X ---------------------------------------
@pytest.fixture
def net_function(memory, netns):
    from pykvm.devices.pci.msix import CONTROL_ENABLE

    vm = StandInVm(memory)
    devices = open_net_devices([NetSpec(tap="pfun0", mac=GUEST_MAC)], "test", vm=vm)
    lines = [RecordingLine(24 + i) for i in range(3)]
    function = VirtioPciDevice(vm, memory, devices[0], interrupt_lines=lines)
    driver = PciDriver(function)
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_STATUS
    assert driver.negotiate(features) & 8
    function.config.write(function.msix.offset + 2, 2, CONTROL_ENABLE)
    for vector in range(3):
        function.msix.write(16 * vector + 12, 4, 0)
    rx, tx = DriverRing(memory, RX_RING, 64), DriverRing(memory, TX_RING, 64)
    driver.setup_queue(RECEIVE_QUEUE, rx, vector=0)
    driver.setup_queue(TRANSMIT_QUEUE, tx, vector=1)
    driver.driver_ok()
    sock = packet_socket("pfun0")
    yield function, driver, rx, tx, lines, sock, vm
    sock.close()
    function.close()
    vm.close()
    assert "pfun0" not in link_names()


def test_frames_flow_both_ways_through_the_worker(net_function, memory):
    function, driver, rx, tx, lines, sock, _ = net_function
    for i in range(32):
        rx.add_chain([(RX_BUFFERS + 0x800 * i, 0x800, True)])
    driver.notify(RECEIVE_QUEUE)
    sent = [frame(i.to_bytes(2, "big") * 300) for i in range(20)]
    for data in sent:                      # the TAP watcher wakes the worker
        sock.send(data)
    assert wait_for(lambda: rx.used_idx() == 20), function.device.stats
    for i, data in enumerate(sent):
        assert memory.read(RX_BUFFERS + 0x800 * i + NET_HDR_SIZE, len(data)) == data
    assert wait_for(lambda: lines[0].triggered >= 1)
    out = frame(b"from the guest" * 10, dst=HOST_MAC)
    memory.write(TX_BUFFERS, bytes(NET_HDR_SIZE) + out)
    tx.add_chain([(TX_BUFFERS, NET_HDR_SIZE + len(out), False)])
    driver.notify(TRANSMIT_QUEUE)
    assert receive_ours(sock, 1) == [out]
    assert wait_for(lambda: tx.used_idx() == 1) and wait_for(lambda: lines[1].triggered >= 1)
    assert function.worker.thread.name == "virtio-net0-io"


def test_a_snapshot_gives_back_the_receive_buffers_the_nic_holds(net_function, memory):
    """After a pass that drained the TAP the NIC holds the next frame's receive chain
    (popped, not used: Linux's ~1 KiB mergeable buffers take the general path). A
    snapshot saves the queue with that chain offered again -- before, the restored
    guest never got it back -- and the live NIC takes it again for the next frame."""
    function, driver, rx, _, _, sock, _ = net_function
    for i in range(4):
        rx.add_chain([(RX_BUFFERS + 0x800 * i, 1024, True)])
    driver.notify(RECEIVE_QUEUE)
    queue = function.queues[RECEIVE_QUEUE]
    assert wait_for(lambda: queue.last_avail_idx == 1), function.device.stats
    with function.quiesced():
        state = function.save_state()
    saved = state.queues[RECEIVE_QUEUE]
    assert (saved.last_avail_idx, saved.used_idx) == (0, 0)
    data = frame(b"after the snapshot" * 20)
    sock.send(data)
    assert wait_for(lambda: rx.used_idx() == 1), function.device.stats
    assert rx.take_used() == [(0, NET_HDR_SIZE + len(data))]
    assert memory.read(RX_BUFFERS + NET_HDR_SIZE, len(data)) == data


def test_more_frames_than_buffers_resume_when_the_guest_refills(net_function, memory):
    function, driver, rx, _, _, sock, _ = net_function
    for i in range(4):
        rx.add_chain([(RX_BUFFERS + 0x800 * i, 0x800, True)])
    driver.notify(RECEIVE_QUEUE)
    for i in range(10):
        sock.send(frame(bytes([i]) * 100))
    assert wait_for(lambda: rx.used_idx() == 4)
    time.sleep(0.05)
    assert rx.used_idx() == 4                       # waiting for buffers, not dropping
    for i in range(4, 16):
        rx.add_chain([(RX_BUFFERS + 0x800 * i, 0x800, True)])
    driver.notify(RECEIVE_QUEUE)
    assert wait_for(lambda: rx.used_idx() == 10)
    payloads = [memory.read(RX_BUFFERS + 0x800 * i + NET_HDR_SIZE + 14, 1)[0] for i in range(10)]
    assert payloads == list(range(10))


def test_hostile_guest_gets_needs_reset_and_can_start_over(net_function, memory, caplog):
    function, driver, rx, _, lines, sock, vm = net_function
    rx.add_chain([(1 << 40, 2048, True)])            # outside guest RAM
    driver.notify(RECEIVE_QUEUE)
    assert wait_for(lambda: driver.status() & STATUS_NEEDS_RESET)
    assert any("device needs reset" in line for line in pykvm_warnings(caplog))
    driver.write(0x14, 1, 0)
    assert driver.status() == 0
    assert driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) & 8
    rx2 = DriverRing(memory, RX_RING, 64)
    driver.setup_queue(RECEIVE_QUEUE, rx2, vector=0)
    driver.driver_ok()
    rx2.add_chain([(RX_BUFFERS, 2048, True)])
    driver.notify(RECEIVE_QUEUE)
    data = frame(b"after reset")
    sock.send(data)
    assert wait_for(lambda: rx2.used_idx() == 1)
    assert memory.read(RX_BUFFERS + NET_HDR_SIZE, len(data)) == data


def test_failed_second_nic_closes_the_first(memory, netns):
    vm = StandInVm(memory)
    with pytest.raises(ConfigError, match="not a bridge"):
        open_net_devices([NetSpec(tap="pok0", bridge="pbrok"), NetSpec(tap="pbad0", bridge="lo")],
                         "test", vm=vm)
    assert link_names() == {"lo"}
    vm.close()


def test_same_tap_twice_is_refused(memory):
    with pytest.raises(ConfigError, match="given twice"):
        open_net_devices([NetSpec(tap="same0"), NetSpec(tap="same0")], "test")


# --- the CLI: whatever way pykvm ends, what it created is gone ------------------------------------
SPIN = b"\xeb\xfe"                  # jmp $: runs until stopped
CRASH = b"\x0f\x0b"                 # ud2 with no IDT in long mode: a triple fault


def start_pykvm(tmp_path, netns, image: bytes, *extra):
    flat = tmp_path / "guest.bin"
    flat.write_bytes(image)
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "pykvm", "run", "--flat", str(flat),
         "--net", "tap=pcli0,bridge=pclibr,host-ip=10.12.0.1/24", "--net", "tap", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_kvm
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_cli_cleans_up_on_signal(tmp_path, netns, how):
    process = start_pykvm(tmp_path, netns, SPIN)
    try:
        assert wait_for(lambda: {"pcli0", "pclibr"} <= link_names()
                        and any(name.startswith("pykvm") for name in link_names()), timeout=30), \
            process.stderr.read() if process.poll() is not None else "pykvm did not start"
        time.sleep(0.3)
        process.send_signal(how)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + how, stderr
    assert link_names() == {"lo"}


@needs_kvm
def test_cli_cleans_up_after_a_guest_crash(tmp_path, netns):
    process = start_pykvm(tmp_path, netns, CRASH, "--entry", "long")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 3 and "triple fault" in stderr, stderr
    assert link_names() == {"lo"}


@needs_kvm
def test_cli_leaves_a_pre_existing_tap_as_it_was(tmp_path, netns):
    ip("tuntap", "add", "dev", "pcli0", "mode", "tap")
    before = link_state("pcli0")
    process = start_pykvm(tmp_path, netns, SPIN)
    try:
        assert wait_for(lambda: "pclibr" in link_names(), timeout=30)
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert link_names() == {"lo", "pcli0"}
    assert link_state("pcli0") == before


def test_the_default_mac_is_sha256_derived_without_loading_openssl():
    """pykvm/net/mac.py hashes with CPython's own SHA-256 (hashlib would map libcrypto
    into every run with a NIC: bench/memory.py); the MAC is the same function's."""
    import hashlib

    from pykvm.net.mac import default_mac

    digest = hashlib.sha256(b"pykvm-net\0some-machine\0" + b"1").digest()
    assert default_mac("some-machine", 1) == bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]
    probe = subprocess.run([sys.executable, "-c", "import sys, pykvm.net.mac; "
                            "print('_hashlib' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout == "False\n"
