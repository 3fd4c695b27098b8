"""virtio-vsock driven through its queues in guest memory (no KVM), its host side on
real Unix sockets: Firecracker's CONNECT/OK handshake, guest-initiated connections
to uds_path_PORT, credit in both directions, hostile headers and chains, bounds,
the socket file's creation, device reset and the snapshot's transport reset."""

import os
import socket
import stat
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.devices.virtio.driver import DriverRing
from pykvm.devices.virtio.queue import Virtqueue, VirtqueueError
from pykvm.devices.virtio.vsock import (EVENT_QUEUE, RX_QUEUE, TX_QUEUE, VIRTIO_ID_VSOCK,
                                        VsockDevice)
from pykvm.errors import ConfigError
from pykvm.vsock import VsockSpec
from pykvm.vsock.connection import BUFFER_SIZE
from pykvm.vsock.muxer import FIRST_LOCAL_PORT, UnixMuxer, bind_listener
from pykvm.vsock.packet import (HEADER_SIZE, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
                                OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
                                SHUTDOWN_BOTH, TYPE_STREAM, Header)

from ..conftest import needs_kvm
from ..fakes import wait_for
from .test_snapshot import counting_guest  # noqa: F401 - the flat guest that counts (a fixture)
from ..unit.test_virtio_blk import memory  # noqa: F401 - the fixture: 2 MiB of guest RAM

CID = 3
RINGS = {RX_QUEUE: 0x1000, TX_QUEUE: 0x3000, EVENT_QUEUE: 0x5000}
SIZE = 16
CHAINS = SIZE // 2          # receive chains of two descriptors (header, 4 KiB) each
TX_BUF = 0x8000
RX_BUF = 0x40000
RX_SLOT = 0x2000
EVENT_BUF = 0x7000
GUEST_BUF_ALLOC = 256 * 1024


class Guest:
    """The guest's driver: its three rings, its packets in and out, its credit."""

    def __init__(self, memory, uds_path, **options):
        self.memory = memory
        self.muxer = UnixMuxer(CID, str(uds_path), **options)
        self.device = VsockDevice(CID, self.muxer)
        self.rings, self.queues = {}, {}
        for index, base in RINGS.items():
            ring = DriverRing(memory, base, SIZE)
            queue = Virtqueue(memory, SIZE)
            queue.desc_addr, queue.avail_addr, queue.used_addr = \
                ring.desc_addr, ring.avail_addr, ring.used_addr
            queue.activate(indirect=False, event_idx=False)
            self.rings[index], self.queues[index] = ring, queue
        self._rx_posted = 0
        self.fwd_cnt = 0                 # what the guest has read, per its packets' fwd_cnt
        self.received: list[tuple[Header, bytes]] = []
        self.post_rx(CHAINS)

    def close(self):
        self.device.close()

    # --- guest -> device --------------------------------------------------------------------
    def send(self, op, src_port=1234, dst_port=5000, payload=b"", *, src_cid=CID,
             dst_cid=HOST_CID, type_=TYPE_STREAM, flags=0, length=None,
             buf_alloc=GUEST_BUF_ALLOC, fwd_cnt=None):
        header = Header(src_cid, dst_cid, src_port, dst_port,
                        len(payload) if length is None else length, type_, op, flags,
                        buf_alloc, self.fwd_cnt if fwd_cnt is None else fwd_cnt)
        self.memory.write(TX_BUF, header.pack())
        buffers = [(TX_BUF, HEADER_SIZE, False)]
        if payload:                       # header and payload in two descriptors, as Linux
            self.memory.write(TX_BUF + 0x1000, payload)
            buffers.append((TX_BUF + 0x1000, len(payload), False))
        self.rings[TX_QUEUE].add_chain(buffers)
        self.device.process_queue(TX_QUEUE, self.queues[TX_QUEUE])
        assert self.rings[TX_QUEUE].take_used()

    def post_rx(self, count):
        for _ in range(count):
            slot = RX_BUF + RX_SLOT * (self._rx_posted % CHAINS)
            self._rx_posted += 1
            self.rings[RX_QUEUE].add_chain([(slot, HEADER_SIZE, True),
                                            (slot + 0x100, 4096, True)])

    # --- device -> guest --------------------------------------------------------------------
    def poll(self):
        """Let the device fill receive buffers; the packets it returned, parsed."""
        self.device.process_queue(RX_QUEUE, self.queues[RX_QUEUE])
        used = self.rings[RX_QUEUE].take_used()
        for head, written in used:
            slot = RX_BUF + RX_SLOT * (head // 2)
            header = Header.unpack(self.memory.read(slot, HEADER_SIZE))
            payload = self.memory.read(slot + 0x100, written - HEADER_SIZE)
            assert header.len == written - HEADER_SIZE
            self.received.append((header, payload))
        self.post_rx(len(used))
        return used

    def expect(self, op, timeout=5.0):
        """The next packet with operation ``op`` (earlier other packets are skipped)."""
        found = []

        def arrived():
            self.poll()
            while self.received:
                header, payload = self.received.pop(0)
                if header.op == op:
                    found.append((header, payload))
                    return True
            return False

        assert wait_for(arrived, timeout), f"no packet with op {op}"
        return found[0]

    def read_stream(self, count, timeout=5.0):
        """``count`` bytes of RW payload, acknowledging them as a guest socket would."""
        data = bytearray()

        others = []

        def arrived():
            self.poll()
            while self.received:
                header, payload = self.received.pop(0)
                if header.op == OP_RW:
                    data.extend(payload)
                    self.fwd_cnt += len(payload)
                else:
                    others.append((header, payload))
            return len(data) >= count

        try:
            assert wait_for(arrived, timeout), f"got {len(data)} of {count} bytes"
        finally:
            self.received[:0] = others
        return bytes(data)

    def quiet(self, seconds=0.3):
        """True if no packet arrives for ``seconds``."""
        return not wait_for(lambda: bool(self.poll()), seconds)


@pytest.fixture
def uds(tmp_path):
    return tmp_path / "v.sock"


@pytest.fixture
def guest(memory, uds):
    guest = Guest(memory, uds)
    yield guest
    guest.close()


def host_listener(uds, port):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{port}")
    listener.listen(8)
    listener.settimeout(5)
    return listener


def connected_from_guest(guest, uds, port=5000, guest_port=1234):
    """A guest-initiated connection, established: (host's accepted socket, listener)."""
    listener = host_listener(uds, port)
    guest.send(OP_REQUEST, src_port=guest_port, dst_port=port)
    header, _ = guest.expect(OP_RESPONSE)
    assert (header.src_port, header.dst_port) == (port, guest_port)
    host, _ = listener.accept()
    host.settimeout(5)
    return host, listener


def connect_from_host(uds, port, extra=b""):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(uds))
    client.sendall(b"CONNECT %d\n" % port + extra)
    return client


def closed(sock):
    """The host end of a connection was closed (EOF or reset)."""
    try:
        return sock.recv(1 << 20) == b""
    except ConnectionResetError:
        return True


# --- the device --------------------------------------------------------------------------
def test_identity_and_config_space(guest):
    assert guest.device.device_id == VIRTIO_ID_VSOCK == 19
    assert len(guest.device.queue_sizes) == 3
    assert guest.device.config_bytes() == struct.pack("<Q", CID)
    assert guest.device.read_config(0, 4) == CID and guest.device.read_config(4, 4) == 0


# --- guest-initiated connections ------------------------------------------------------------
def test_guest_connects_to_uds_path_port_and_both_directions_flow(guest, uds):
    host, listener = connected_from_guest(guest, uds)
    guest.send(OP_RW, payload=b"hello from the guest")
    assert host.recv(100) == b"hello from the guest"
    host.sendall(b"hello from the host")
    assert guest.read_stream(19) == b"hello from the host"
    guest.send(OP_SHUTDOWN, flags=SHUTDOWN_BOTH)
    header, _ = guest.expect(OP_RST)          # the host end completes the guest's close
    assert (header.src_port, header.dst_port) == (5000, 1234)
    assert closed(host)
    host.close()
    listener.close()


def test_a_guest_request_without_a_listener_is_reset(guest):
    guest.send(OP_REQUEST, dst_port=4242)
    header, _ = guest.expect(OP_RST)
    assert (header.src_port, header.dst_port, header.dst_cid) == (4242, 1234, CID)
    assert not guest.muxer.connections


def test_the_host_closing_sends_the_guest_a_shutdown(guest, uds):
    host, listener = connected_from_guest(guest, uds)
    host.sendall(b"last words")
    host.close()
    assert guest.read_stream(10) == b"last words"
    header, _ = guest.expect(OP_SHUTDOWN)
    assert header.flags & 2                    # the host will send no more
    guest.send(OP_RST)
    assert wait_for(lambda: not guest.muxer.connections)
    listener.close()


# --- host-initiated connections (Firecracker's CONNECT / OK) --------------------------------
def test_host_connect_handshake_and_early_bytes(guest, uds):
    client = connect_from_host(uds, 52, extra=b"sent before OK")
    header, _ = guest.expect(OP_REQUEST)
    assert header.dst_port == 52 and header.src_port >= FIRST_LOCAL_PORT
    assert (header.src_cid, header.dst_cid, header.buf_alloc) == (HOST_CID, CID, BUFFER_SIZE)
    guest.send(OP_RESPONSE, src_port=52, dst_port=header.src_port)
    assert client.recv(64) == b"OK %d\n" % header.src_port
    assert guest.read_stream(14) == b"sent before OK"
    guest.send(OP_RW, src_port=52, dst_port=header.src_port, payload=b"reply")
    assert client.recv(64) == b"reply"
    client.close()


def test_a_guest_refusing_a_host_connection_closes_the_client(guest, uds):
    client = connect_from_host(uds, 53)
    header, _ = guest.expect(OP_REQUEST)
    guest.send(OP_RST, src_port=53, dst_port=header.src_port)
    assert closed(client)
    client.close()


@pytest.mark.parametrize("line", [b"HELLO 52\n", b"CONNECT -1\n", b"CONNECT 99999999999\n",
                                  b"CONNECT 5" + b"0" * 40, b"connect 52\n"])
def test_bad_handshakes_are_closed_without_a_packet(guest, uds, line):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(uds))
    client.sendall(line)
    assert closed(client)
    assert guest.quiet() and not guest.muxer.connections
    client.close()


def test_a_handshake_that_never_comes_times_out(memory, uds, monkeypatch):
    monkeypatch.setattr("pykvm.vsock.host_sockets.HANDSHAKE_TIMEOUT", 0.2)
    guest = Guest(memory, uds)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(str(uds))
        client.sendall(b"CONN")
        assert closed(client)
        client.close()
    finally:
        guest.close()


def test_a_guest_that_never_answers_a_request_is_given_up_on(memory, uds, monkeypatch):
    monkeypatch.setattr("pykvm.vsock.host_sockets.CONNECT_TIMEOUT", 0.2)
    guest = Guest(memory, uds)
    try:
        client = connect_from_host(uds, 54)
        header, _ = guest.expect(OP_REQUEST)
        assert closed(client)
        rst, _ = guest.expect(OP_RST)
        assert (rst.src_port, rst.dst_port) == (header.src_port, 54)
        client.close()
    finally:
        guest.close()


# --- credit ---------------------------------------------------------------------------------------
def test_host_to_guest_respects_the_guests_credit(guest, uds):
    listener = host_listener(uds, 6000)
    guest.send(OP_REQUEST, dst_port=6000, buf_alloc=100)
    guest.expect(OP_RESPONSE)
    host, _ = listener.accept()
    host.sendall(bytes(range(250)))
    got = guest.read_stream(100)
    assert got == bytes(range(100))
    assert guest.quiet()                      # no credit left: nothing more comes
    guest.send(OP_CREDIT_UPDATE, dst_port=6000, buf_alloc=100, fwd_cnt=100)
    assert guest.read_stream(100) == bytes(range(100, 200))
    host.close()
    listener.close()


def test_a_credit_request_is_answered_with_the_hosts_credit(guest, uds):
    host, listener = connected_from_guest(guest, uds)
    guest.send(OP_CREDIT_REQUEST)
    header, _ = guest.expect(OP_CREDIT_UPDATE)
    assert (header.buf_alloc, header.fwd_cnt) == (BUFFER_SIZE, 0)
    host.close()
    listener.close()


def test_the_host_taking_the_guests_bytes_gives_credit_back(guest, uds):
    host, listener = connected_from_guest(guest, uds)
    conn = guest.muxer.connections[(5000, 1234)]
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    chunk = b"x" * 4096
    for _ in range(BUFFER_SIZE // len(chunk)):   # all the credit, the host not reading
        guest.send(OP_RW, payload=chunk)
    assert 0 < len(conn.tx) <= BUFFER_SIZE       # waiting in the muxer, within the credit
    received = 0
    while received < BUFFER_SIZE:
        received += len(host.recv(1 << 20))
    heard = 0
    while heard < BUFFER_SIZE:                   # the guest hears all of it was taken
        header, _ = guest.expect(OP_CREDIT_UPDATE)
        assert header.buf_alloc == BUFFER_SIZE
        heard = header.fwd_cnt
    assert heard == BUFFER_SIZE
    host.close()
    listener.close()


def test_a_guest_sending_beyond_its_credit_is_reset(guest, uds):
    host, listener = connected_from_guest(guest, uds)
    chunk = b"y" * 32768
    for _ in range(200):                       # the host never reads: its socket fills
        guest.send(OP_RW, payload=chunk)
        conn = guest.muxer.connections.get((5000, 1234))
        if conn is None:
            break
        assert len(conn.tx) <= BUFFER_SIZE     # host memory stays bounded by the credit
    else:
        pytest.fail("a guest ignoring its credit was never reset")
    guest.expect(OP_RST)
    assert guest.muxer.stats["credit_violations"] == 1
    host.close()
    listener.close()


# --- hostile packets -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    dict(src_cid=7), dict(src_cid=HOST_CID), dict(dst_cid=CID), dict(dst_cid=1 << 40),
    dict(type_=2), dict(op=0), dict(op=99), dict(op=OP_RW, length=10),
    dict(op=OP_RW, payload=b"a", length=0), dict(op=OP_RW, payload=b"a" * 16, length=17),
    dict(op=OP_RW, payload=b"a" * 8, length=(64 << 10) + 1),
    dict(op=OP_CREDIT_UPDATE, payload=b"zz"), dict(op=OP_SHUTDOWN, flags=4, payload=b""),
])
def test_a_bad_packet_resets_its_connection_and_nothing_else(guest, uds, bad):
    host, listener = connected_from_guest(guest, uds)
    other, other_listener = connected_from_guest(guest, uds, port=5001, guest_port=1235)
    options = dict(op=OP_RW, payload=b"data")
    options.update(bad)
    guest.send(options.pop("op"), **options)
    header, _ = guest.expect(OP_RST)
    assert (header.src_port, header.dst_port, header.src_cid, header.dst_cid) == \
        (5000, 1234, HOST_CID, CID)
    assert closed(host)
    guest.send(OP_RW, src_port=1235, dst_port=5001, payload=b"still here")
    assert other.recv(64) == b"still here"
    for sock in (host, listener, other, other_listener):
        sock.close()


def test_packets_out_of_order_reset_the_connection(guest, uds):
    client = connect_from_host(uds, 60)
    header, _ = guest.expect(OP_REQUEST)
    guest.send(OP_RW, src_port=60, dst_port=header.src_port, payload=b"too early")
    guest.expect(OP_RST)
    assert closed(client)
    host, listener = connected_from_guest(guest, uds)
    guest.send(OP_RESPONSE)                    # we never asked
    guest.expect(OP_RST)
    assert closed(host)
    guest.send(OP_RW, src_port=999, dst_port=998, payload=b"nobody")
    header, _ = guest.expect(OP_RST)
    assert (header.src_port, header.dst_port) == (998, 999)
    for sock in (client, host, listener):
        sock.close()


def test_malformed_chains_are_dropped_and_counted(guest, memory):
    ring = guest.rings[TX_QUEUE]
    ring.add_chain([(TX_BUF, HEADER_SIZE - 1, False)])           # no room for a header
    ring.add_chain([(TX_BUF, HEADER_SIZE, False), (TX_BUF + 0x1000, 16, True)])
    guest.device.process_queue(TX_QUEUE, guest.queues[TX_QUEUE])
    assert len(ring.take_used()) == 2
    assert guest.device.stats["tx_malformed_chains"] == 2


def test_a_receive_chain_without_room_for_a_header_breaks_the_queue(guest, uds):
    ring = guest.rings[RX_QUEUE] = DriverRing(guest.memory, 0x20000, SIZE)
    queue = guest.queues[RX_QUEUE] = Virtqueue(guest.memory, SIZE)
    queue.desc_addr, queue.avail_addr, queue.used_addr = \
        ring.desc_addr, ring.avail_addr, ring.used_addr
    queue.activate(indirect=False, event_idx=False)
    ring.add_chain([(RX_BUF, 16, True)])
    guest.send(OP_REQUEST, dst_port=4242)      # an RST is due
    assert wait_for(guest.muxer.has_pending)
    with pytest.raises(VirtqueueError):
        guest.device.process_queue(RX_QUEUE, queue)


def test_connections_are_bounded(memory, uds):
    guest = Guest(memory, uds, max_connections=2)
    listener = host_listener(uds, 5000)
    try:
        for port in (1, 2):
            guest.send(OP_REQUEST, src_port=port)
            guest.expect(OP_RESPONSE)
        guest.send(OP_REQUEST, src_port=3)
        header, _ = guest.expect(OP_RST)
        assert header.dst_port == 3 and guest.muxer.stats["refused_too_many"] == 1
        assert len(guest.muxer.connections) == 2
    finally:
        guest.close()
        listener.close()


def test_resets_for_a_flood_of_unknown_packets_are_bounded(guest):
    for port in range(400):
        guest.send(OP_RW, src_port=port, payload=b"?")
    assert len(guest.muxer._resets) <= 256
    assert guest.muxer.stats["resets_dropped"] == 400 - 256


# --- the socket file ------------------------------------------------------------------------------
def test_the_socket_is_private_and_removed_on_close(memory, uds):
    guest = Guest(memory, uds)
    assert oct(os.lstat(uds).st_mode & 0o777) == "0o600"
    guest.close()
    assert not os.path.lexists(uds)


def test_a_symlink_or_file_at_uds_path_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "v.sock"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="exists already"):
        bind_listener(str(link))
    assert not os.path.lexists(target)
    plain = tmp_path / "plain"
    plain.write_text("mine")
    with pytest.raises(ConfigError, match="exists already"):
        bind_listener(str(plain))
    assert plain.read_text() == "mine"


def test_a_guest_listener_owned_by_another_user_is_not_dialled(guest, uds, monkeypatch):
    monkeypatch.setattr("pykvm.vsock.host_sockets.peer_refusal", lambda sock: "uid 1234 may not")
    listener = host_listener(uds, 5000)
    guest.send(OP_REQUEST)
    guest.expect(OP_RST)
    listener.close()


# --- reset and snapshots -------------------------------------------------------------------------
def test_a_device_reset_drops_every_connection(guest, uds):
    host, listener = connected_from_guest(guest, uds)
    guest.device.reset()
    assert closed(host) and not guest.muxer.connections
    host.close()
    listener.close()


def test_restore_sends_a_transport_reset_event(memory, uds, tmp_path):
    guest = Guest(memory, uds)
    state = guest.device.save_state()
    assert state.to_json() == {"tag": "virtio-vsock", "guest_cid": CID}
    guest.close()
    restored = Guest(memory, tmp_path / "w.sock")
    try:
        restored.device.restore_state(state)
        memory.write(EVENT_BUF, b"\xff" * 4)
        restored.rings[EVENT_QUEUE].add_chain([(EVENT_BUF, 4, True)])
        restored.device.process_queue(EVENT_QUEUE, restored.queues[EVENT_QUEUE])
        assert restored.rings[EVENT_QUEUE].take_used() == [(0, 4)]
        assert memory.read(EVENT_BUF, 4) == struct.pack("<I", 0)    # TRANSPORT_RESET
        restored.rings[EVENT_QUEUE].add_chain([(EVENT_BUF, 4, True)])
        restored.device.process_queue(EVENT_QUEUE, restored.queues[EVENT_QUEUE])
        assert restored.rings[EVENT_QUEUE].take_used() == []       # one event, once
    finally:
        restored.close()


@pytest.mark.parametrize("state", [{"guest_cid": 4}, {"guest_cid": 2}, {}, {"guest_cid": "3"},
                                   {"guest_cid": 3, "connections": []}])
def test_a_bad_saved_state_is_refused(guest, state):
    from pykvm.snapshot.state import SnapshotError, decode_for
    with pytest.raises(SnapshotError):
        guest.device.restore_state(decode_for(guest.device, {"tag": "virtio-vsock", **state},
                                              "vsock"))


# --- the option ----------------------------------------------------------------------------------
def test_vsock_spec_parsing():
    assert VsockSpec.parse("3") == VsockSpec(3, "")
    assert VsockSpec.parse("42,uds=/tmp/x.sock") == VsockSpec(42, "/tmp/x.sock")
    for bad in ("2", "0", "4294967295", "x", "3,uds=", "3,path=/x", "-3", "3," + "u" * 5,
                "3,uds=/" + "a" * 200):
        with pytest.raises(ConfigError):
            VsockSpec.parse(bad)


# --- a machine's device and its snapshot (KVM, a flat guest) ---------------------------------
@needs_kvm
def test_a_restored_machine_listens_again_and_resets_the_guests_sockets(counting_guest,
                                                                         tmp_path):
    import io
    import time

    from pykvm import layout
    from pykvm.machine import MachineConfig, build_for_boot, build_from_snapshot
    from pykvm.snapshot import SnapshotError, save_snapshot

    uds = tmp_path / "v.sock"
    config = MachineConfig(flat=counting_guest, mem_size=layout.MIN_MEM_SIZE + 0x10000,
                           vsock_cid=3, vsock_uds=str(uds))
    with build_for_boot(config, stdout=io.BytesIO()) as machine:
        assert stat.S_ISSOCK(os.lstat(uds).st_mode)
        machine.vm.start()
        time.sleep(0.2)
        save_snapshot(machine, tmp_path / "snap")
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
    assert not os.path.lexists(uds)                # the machine's close removed it
    with pytest.raises(SnapshotError, match="vsock socket"):   # a host resource: trust it
        build_from_snapshot(tmp_path / "snap", stdout=io.BytesIO())
    assert not os.path.lexists(uds)
    with build_from_snapshot(tmp_path / "snap", stdout=io.BytesIO(), trust=True) as restored:
        assert restored.vsock.guest_cid == 3 and restored.vsock._reset_event_due
        assert stat.S_ISSOCK(os.lstat(uds).st_mode)
    assert not os.path.lexists(uds)


def test_without_uds_the_socket_is_private_and_goes_with_the_device():
    from pykvm.devices.virtio.vsock import open_vsock_device
    device = open_vsock_device(VsockSpec(3))
    directory = os.path.dirname(device.uds_path)
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert stat.S_ISSOCK(os.lstat(device.uds_path).st_mode)
    device.close()
    assert not os.path.exists(directory)


@pytest.mark.parametrize("arguments, message", [
    (["--vsock", "2"], "vsock guest CID 2: must be 3 to"),
    (["--vsock", "3,port=5"], "unknown option 'port=5'"),
    (["--restore", "/nonexistent", "--vsock", "3"], "drop --vsock"),
])
def test_the_option_is_refused_in_one_line(arguments, message):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "pykvm", "run", *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# --- a hostile guest's packet sequences (hypothesis) ---------------------------------------------
PACKET = st.tuples(
    st.sampled_from([OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE,
                     OP_CREDIT_REQUEST, 0, 8, 0xFFFF]),
    st.sampled_from([1234, 1235, 0, 0xFFFF_FFFF]),                  # guest port
    st.sampled_from([5000, 5001, 7, FIRST_LOCAL_PORT]),             # host port
    st.sampled_from([b"", b"x", b"y" * 4096, b"z" * 60000]),
    st.sampled_from([None, 0, 1, 0xFFFF_FFFF]),                     # len: the payload's if None
    st.sampled_from([CID, CID, 2, 0xFFFF_FFFF_FFFF_FFFF]),           # src_cid
    st.sampled_from([HOST_CID, HOST_CID, CID]),                     # dst_cid
    st.sampled_from([TYPE_STREAM, TYPE_STREAM, 2, 0]),
    st.sampled_from([0, 1, 2, 3, 0xFFFF_FFFF]),                     # flags
    st.sampled_from([0, 100, GUEST_BUF_ALLOC, 0xFFFF_FFFF]),        # buf_alloc
    st.sampled_from([0, 100, 0xFFFF_FFFF]),                         # fwd_cnt
)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets=st.lists(PACKET, min_size=1, max_size=40))
def test_any_packet_sequence_leaves_the_device_and_the_muxer_sound(memory, packets):
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        uds = os.path.join(directory, "v.sock")
        listeners = [host_listener(uds, port) for port in (5000, 5001)]
        guest = Guest(memory, uds, max_connections=4)
        try:
            for op, src, dst, payload, length, src_cid, dst_cid, kind, flags, alloc, fwd in \
                    packets:
                guest.send(op, src_port=src, dst_port=dst, payload=payload, length=length,
                           src_cid=src_cid, dst_cid=dst_cid, type_=kind, flags=flags,
                           buf_alloc=alloc, fwd_cnt=fwd)
                guest.poll()
                muxer = guest.muxer
                assert len(muxer.connections) <= 4
                assert all(len(conn.tx) <= BUFFER_SIZE for conn in muxer.connections.values())
                assert len(muxer._resets) <= 256
            for header, payload in guest.received:   # what the guest got is well-formed
                assert (header.src_cid, header.dst_cid, header.type) == (HOST_CID, CID, 1)
                assert header.len == len(payload) <= 4096
        finally:
            guest.close()
            for listener in listeners:
                listener.close()
