"""MMDS (pykvm/mmds/): the data store (PUT, RFC 7396 PATCH, the size limit, JSON
pointers, the IMDS form), V2's tokens on a clock the test moves, the guest's HTTP
requests, and the in-VMM stack fed crafted frames (ARP, the TCP handshake, a request,
the response, FIN, RST, and malformed frames a hostile guest sends)."""

from __future__ import annotations

import json
import struct

import pytest

from pykvm.mmds.guest_http import MAX_REQUEST, V1, V2, MmdsService
from pykvm.mmds.stack import (ACK, FIN, MAX_CONNECTIONS, MMDS_MAC, PSH, RST, SYN, MmdsStack,
                              _checksum)
from pykvm.mmds.store import (MetadataStore, NotFound, NotInitialized, StoreError,
                              TokenAuthority, Unsupported, imds_text, merge_patch)

DATA = {"latest": {"meta-data": {"ami-id": "ami-87654321", "reservation-id": "r-79054aef"},
                   "user-data": "hello", "count": 3, "list": ["a", "b"]}}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- the store --------------------------------------------------------------------------------------
def test_merge_patch_is_rfc_7396():
    # RFC 7396 appendix A, a few of its cases
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": "b"}, {"b": "c"}) == {"a": "b", "b": "c"}
    assert merge_patch({"a": "b"}, {"a": None}) == {}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}
    assert merge_patch([1, 2], {"a": "b", "c": None}) == {"a": "b"}
    assert merge_patch({}, {"a": {"bb": {"ccc": None}}}) == {"a": {"bb": {}}}


def test_store_put_patch_limits_and_lookup():
    store = MetadataStore(size_limit=200)
    assert store.get() == {} and not store.initialized
    with pytest.raises(NotInitialized):
        store.patch({"a": 1})
    with pytest.raises(NotInitialized):
        store.lookup("/")
    with pytest.raises(StoreError, match="must be a JSON object"):
        store.put([1])
    store.put(DATA)
    with pytest.raises(StoreError, match="size limit was exceeded: .* bytes > 200 bytes"):
        store.patch({"big": "x" * 200})
    assert store.get() == DATA                                      # refused whole
    store.patch({"latest": {"user-data": None, "new": "v"}})
    assert "user-data" not in store.get()["latest"] and store.get()["latest"]["new"] == "v"
    assert store.lookup("/latest/meta-data/ami-id") == "ami-87654321"
    assert store.lookup("/latest/meta-data/") == DATA["latest"]["meta-data"]
    assert store.lookup("/latest/list/1") == "b"
    for path in ("/nope", "/latest/list/01", "/latest/list/9", "/latest/count/x", "latest"):
        with pytest.raises(NotFound):
            store.lookup(path)


def test_imds_form():
    assert imds_text(DATA["latest"]) == "meta-data/\nuser-data\ncount\nlist"
    assert imds_text("x") == "x"
    with pytest.raises(Unsupported):
        imds_text(3)


def test_tokens_expire_and_are_bounded():
    clock = Clock()
    tokens = TokenAuthority(clock)
    first = tokens.generate(10)
    assert tokens.valid(first) and not tokens.valid("x" * 64) and not tokens.valid(None)
    clock.now += 11
    assert not tokens.valid(first)
    for bad in (0, 21601):
        with pytest.raises(ValueError, match="between 1 and 21600"):
            tokens.generate(bad)
    made = [tokens.generate(100) for _ in range(70)]
    assert not tokens.valid(made[0]) and tokens.valid(made[-1])


# --- the guest's HTTP ------------------------------------------------------------------------------
def request(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode() + b"\r\n\r\n"


def status_and_body(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


@pytest.fixture
def store():
    result = MetadataStore()
    result.put(DATA)
    return result


def test_v1_get_in_imds_and_json(store):
    service = MmdsService(store, V1)
    answer, used = service.answer(request("GET /latest HTTP/1.1\nHost: x"))
    assert status_and_body(answer) == (200, "meta-data/\nuser-data\ncount\nlist")
    assert used == len(request("GET /latest HTTP/1.1\nHost: x"))
    answer, _ = service.answer(request("GET /latest/meta-data HTTP/1.1\n"
                                       "Accept: application/json"))
    assert json.loads(status_and_body(answer)[1]) == DATA["latest"]["meta-data"]
    assert status_and_body(service.answer(request("GET /latest/count HTTP/1.1"))[0])[0] == 501
    assert status_and_body(service.answer(request("GET /nope HTTP/1.1"))[0])[0] == 404
    answer = service.answer(request("POST /latest HTTP/1.1"))[0]
    assert status_and_body(answer)[0] == 405 and b"Allow: GET, PUT" in answer
    assert service.answer(b"GET /latest HTTP/1.1\r\nHost: x\r\n") == (None, 0)   # incomplete
    empty = MmdsService(MetadataStore(), V1)
    assert status_and_body(empty.answer(request("GET / HTTP/1.1"))[0])[0] == 404


def test_v2_needs_a_token(store):
    clock = Clock()
    service = MmdsService(store, V2, TokenAuthority(clock))
    get = "GET /latest/meta-data/ami-id HTTP/1.1"
    assert status_and_body(service.answer(request(get))[0])[0] == 401
    assert status_and_body(service.answer(request(get + "\nX-metadata-token: bad"))[0])[0] == 401
    put = "PUT /latest/api/token HTTP/1.1"
    assert status_and_body(service.answer(request(put))[0])[0] == 400         # no TTL
    for ttl in ("0", "21601", "-1", "x"):
        answer = service.answer(request(f"{put}\nX-metadata-token-ttl-seconds: {ttl}"))[0]
        assert status_and_body(answer)[0] == 400
    answer = service.answer(request(f"{put}\nX-metadata-token-ttl-seconds: 60\n"
                                    f"X-Forwarded-For: 1.2.3.4"))[0]
    assert status_and_body(answer)[0] == 400
    assert status_and_body(service.answer(request(
        "PUT /latest/other HTTP/1.1\nX-metadata-token-ttl-seconds: 60"))[0])[0] == 404
    status, token = status_and_body(service.answer(request(
        f"{put}\nX-aws-ec2-metadata-token-ttl-seconds: 60"))[0])
    assert status == 200 and len(token) == 64
    assert status_and_body(service.answer(request(f"{get}\nX-metadata-token: {token}"))[0]) \
        == (200, "ami-87654321")
    clock.now += 61
    assert status_and_body(service.answer(request(f"{get}\nX-metadata-token: {token}"))[0])[0] \
        == 401


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET x HTTP/1.1\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"])
def test_malformed_requests_are_400(store, raw):
    assert status_and_body(MmdsService(store).answer(raw)[0])[0] == 400


def test_requests_are_bounded(store):
    service = MmdsService(store)
    assert status_and_body(service.answer(b"G" * (MAX_REQUEST + 1))[0])[0] == 413
    big = b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
    assert status_and_body(service.answer(big)[0])[0] == 413


# --- the stack --------------------------------------------------------------------------------------
GUEST_MAC = bytes.fromhex("52540012345f")
GUEST_IP = bytes([169, 254, 0, 2])
MMDS_IP = bytes([169, 254, 169, 254])


def eth(kind: int, payload: bytes, dst=MMDS_MAC) -> bytes:
    return dst + GUEST_MAC + struct.pack("!H", kind) + payload


def arp(target_ip=MMDS_IP, oper=1) -> bytes:
    return eth(0x0806, struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, oper, GUEST_MAC, GUEST_IP,
                                   bytes(6), target_ip), dst=b"\xff" * 6)


def ipv4(payload: bytes, dst=MMDS_IP, proto=6, frag=0x4000) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                         GUEST_IP, dst)
    return eth(0x0800, header + payload)


def tcp(flags, seq, ack=0, data=b"", sport=40000, dport=80, window=65535, options=b"") -> bytes:
    offset = (20 + len(options)) // 4
    return ipv4(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window,
                            0, 0) + options + data)


def parse_tcp(frame: bytes) -> dict:
    assert frame[:6] == GUEST_MAC and frame[6:12] == MMDS_MAC
    ip = frame[14:34]
    assert _checksum(ip) == 0                                  # the header checksum holds
    total = struct.unpack("!H", ip[2:4])[0]
    segment = frame[34:14 + total]
    pseudo = MMDS_IP + GUEST_IP + struct.pack("!BBH", 0, 6, len(segment))
    assert _checksum(pseudo + segment) == 0                    # and the TCP checksum
    sport, dport, seq, ack, offset, flags, window = struct.unpack_from("!HHIIBBH", segment)
    return {"sport": sport, "dport": dport, "seq": seq, "ack": ack, "flags": flags,
            "data": segment[(offset >> 4) * 4:], "options": segment[20:(offset >> 4) * 4]}


@pytest.fixture
def stack(store):
    return MmdsStack(MmdsService(store, V1))


def handshake(stack, sport=40000, isn=1000, mss=1460):
    syn_ack, = stack.filter(tcp(SYN, isn, sport=sport,
                                options=struct.pack("!BBH", 2, 4, mss)))
    reply = parse_tcp(syn_ack)
    assert reply["flags"] == SYN | ACK and reply["ack"] == isn + 1
    assert reply["options"] == struct.pack("!BBH", 2, 4, 1460)
    assert stack.filter(tcp(ACK, isn + 1, reply["seq"] + 1, sport=sport)) == []
    return reply["seq"] + 1


def test_arp_for_the_mmds_address_only(stack):
    reply, = stack.filter(arp())
    assert reply[:6] == GUEST_MAC and reply[6:12] == MMDS_MAC
    oper, sha, spa, tha, tpa = struct.unpack_from("!H6s4s6s4s", reply, 14 + 6)
    assert (oper, sha, spa, tha, tpa) == (2, MMDS_MAC, MMDS_IP, GUEST_MAC, GUEST_IP)
    assert stack.filter(arp(target_ip=bytes([10, 0, 0, 1]))) is None    # the back end's
    assert stack.filter(arp(oper=2)) == []                            # claimed, not answered
    assert stack.filter(arp()[:30]) is None                            # too short to be ARP


def test_get_over_tcp_then_close(stack):
    ours = handshake(stack)
    get = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
    frames = [parse_tcp(f) for f in stack.filter(tcp(ACK | PSH, 1001, ours, get))]
    data = b"".join(f["data"] for f in frames)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nami-87654321")
    assert frames[-1]["flags"] & FIN and frames[0]["ack"] == 1001 + len(get)
    fin_seq = frames[-1]["seq"]
    assert stack.filter(tcp(ACK, 1001 + len(get), fin_seq + 1)) == []
    last, = stack.filter(tcp(FIN | ACK, 1001 + len(get), fin_seq + 1))
    assert parse_tcp(last)["flags"] == ACK and not stack.connections    # closed and gone


def test_a_request_in_two_segments_and_out_of_order_data(stack):
    ours = handshake(stack)
    first, second = b"GET /latest HTTP/1.1\r\n", b"Host: x\r\n\r\n"
    ack, = stack.filter(tcp(ACK | PSH, 1001 + len(first), ours, second))   # ahead: not taken
    assert parse_tcp(ack)["ack"] == 1001 and parse_tcp(ack)["data"] == b""
    ack, = stack.filter(tcp(ACK | PSH, 1001, ours, first))
    assert parse_tcp(ack)["ack"] == 1001 + len(first)
    frames = [parse_tcp(f) for f in stack.filter(tcp(ACK | PSH, 1001 + len(first), ours,
                                                     second))]
    assert b"meta-data/" in b"".join(f["data"] for f in frames)


def test_large_response_respects_mss_and_window_and_resends_on_duplicate_ack(store):
    store.put({"big": "x" * 20000})
    stack = MmdsStack(MmdsService(store, V1))
    ours = handshake(stack, mss=1000)
    get = b"GET /big HTTP/1.1\r\n\r\n"
    frames = [parse_tcp(f) for f in stack.filter(tcp(ACK, 1001, ours, get, window=4000))]
    assert all(len(f["data"]) <= 1000 for f in frames)
    assert sum(len(f["data"]) for f in frames) == 4000               # the guest's window
    again = [parse_tcp(f) for f in stack.filter(tcp(ACK, 1001 + len(get), ours, window=4000))]
    assert again[0]["seq"] == ours                                    # from the first byte
    received, acked = b"", ours
    for _ in range(100):
        chunk = [parse_tcp(f) for f in stack.filter(tcp(ACK, 1001 + len(get), acked,
                                                        window=8000))]
        for f in chunk:                      # in order, each acknowledged at once
            if f["seq"] == acked:
                received += f["data"]
                acked += len(f["data"]) + (1 if f["flags"] & FIN else 0)
        if any(f["flags"] & FIN for f in chunk if f["seq"] + len(f["data"]) + 1 == acked):
            break
    assert received.endswith(b"x" * 20000) and received.startswith(b"HTTP/1.1 200")


def test_resets_and_bounds(stack):
    reply, = stack.filter(tcp(ACK, 5, 77))                    # no such connection
    assert parse_tcp(reply)["flags"] == RST and parse_tcp(reply)["seq"] == 77
    reply, = stack.filter(tcp(SYN, 5, dport=22))              # another port
    assert parse_tcp(reply)["flags"] == RST | ACK and parse_tcp(reply)["ack"] == 6
    ours = handshake(stack)
    assert stack.filter(tcp(RST, 1001, ours)) == [] and not stack.connections
    ours = handshake(stack)
    reply = stack.filter(tcp(ACK, 1001, ours, b"G" * (MAX_REQUEST + 1)))
    assert parse_tcp(reply[-1])["flags"] & (RST | FIN)        # refused, never buffered
    for port in range(MAX_CONNECTIONS + 5):
        handshake(stack, sport=20000 + port)
    assert len(stack.connections) == MAX_CONNECTIONS


@pytest.mark.parametrize("frame", [
    ipv4(b"\x00" * 10),                                          # TCP header too short
    ipv4(b"\x00" * 40, proto=17),                                # UDP
    ipv4(b"\x00" * 40, frag=0x2000),                             # a fragment
    ipv4(b"\x00" * 40)[:40],                                     # total length lies
    ipv4(struct.pack("!HHIIBBHHH", 1, 80, 0, 0, 0xF0, ACK, 0, 0, 0)),   # offset past the end
    ipv4(struct.pack("!HHIIBBHHH", 1, 80, 0, 0, 0x10, ACK, 0, 0, 0)),   # offset under 5
    eth(0x0800, b"\x46" + bytes(15) + MMDS_IP),                 # ihl says options: none
])
def test_malformed_frames_to_the_address_are_dropped(stack, frame):
    assert stack.filter(frame) == []
    assert not stack.connections


def test_other_traffic_passes_through(stack):
    assert stack.filter(tcp(SYN, 1)[:14]) is None
    assert stack.filter(ipv4(b"\x00" * 40, dst=bytes([10, 0, 0, 1]))) is None
    assert stack.filter(eth(0x86DD, bytes(60))) is None          # IPv6
    assert stack.filter(b"\x01") is None


def test_a_retransmitted_request_gets_the_response_again(stack):
    """Our response was lost on the way (the guest never acknowledged it): the guest's
    retransmission of its request makes us send it again from the first byte."""
    ours = handshake(stack)
    get = b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n"
    first = [parse_tcp(f) for f in stack.filter(tcp(ACK | PSH, 1001, ours, get))]
    again = [parse_tcp(f) for f in stack.filter(tcp(ACK | PSH, 1001, ours, get))]
    assert [(f["seq"], f["data"], f["flags"]) for f in again] == \
        [(f["seq"], f["data"], f["flags"]) for f in first]
    assert again[0]["seq"] == ours and again[-1]["flags"] & FIN


CONFINED_EXCHANGE = """
import sys, threading
from pykvm import sandbox
from pykvm.mmds.guest_http import V2, MmdsService
from pykvm.mmds.store import MetadataStore
from tests.unit.test_mmds import DATA
store = MetadataStore()
store.put(DATA)
service = MmdsService(store, V2)
result = []
def worker():
    sandbox.thread_role("device")          # as a NIC's queue worker runs
    put = b"PUT /latest/api/token HTTP/1.1\\r\\nX-metadata-token-ttl-seconds: 9\\r\\n\\r\\n"
    token = service.answer(put)[0].split(b"\\r\\n\\r\\n")[1].decode()
    get = f"GET /latest/user-data HTTP/1.1\\r\\nX-metadata-token: {token}\\r\\n\\r\\n"
    result.append(service.answer(get.encode())[0])
thread = threading.Thread(target=worker)
thread.start()
thread.join()
sys.stdout.write(result[0].decode())
"""


def test_a_v2_exchange_on_a_confined_device_thread():
    """The guest's requests are answered on the NIC's worker, under the device role's
    seccomp filter, which cannot open a file: nothing on that path may import lazily
    (the first GET with a token once imported hmac there, and the NIC stopped)."""
    import subprocess
    import sys
    from pathlib import Path
    done = subprocess.run([sys.executable, "-c", CONFINED_EXCHANGE], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("HTTP/1.1 200 OK") and done.stdout.endswith("hello")
