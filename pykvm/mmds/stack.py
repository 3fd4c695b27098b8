"""The minimal network stack MMDS answers the guest with (Firecracker's "dumbo",
docs/mmds/mmds-design.md): a :class:`~pykvm.devices.virtio.net.FrameFilter` on each
NIC that /mmds/config names.

What it claims: ARP requests for the MMDS address (RFC 826) -- answered with
MMDS_MAC -- and IPv4 datagrams to that address (RFC 791). Everything else goes on to
the NIC's back end untouched. Of what it claims it serves TCP to port 80 (RFC 9293):

- the handshake (SYN -> SYN-ACK carrying our MSS; the guest's MSS option is honoured,
  no window scaling, SACK or timestamps are offered, so none are used);
- data in order only: a segment that does not start at the next expected byte is
  answered with an ACK of what we have (the guest retransmits), never reassembled;
- each connection takes one HTTP request (guest_http.py, at most MAX_REQUEST bytes),
  sends the response within the guest's window and MAX_IN_FLIGHT bytes, then FIN;
  a duplicate ACK, or the guest retransmitting what we already have, re-sends from the
  first unacknowledged byte (there is no retransmission timer: replies go straight
  into the guest's receive queue, so the guest's own retransmissions drive ours);
- RST for a segment of no connection, for another port, and when the table is full;
  a connection ends at RST, or when both FINs are acknowledged.

Bounds: at most MAX_CONNECTIONS connections (the least recently active one is dropped
for a new SYN), a request of MAX_REQUEST bytes, a response of the store's size limit
plus headers. The guest is hostile: every length field is checked against the frame
before it is used; fragments, IP options beyond the header length, and frames that
lie about their lengths are dropped. Checksums of the guest's segments are not
checked (with VIRTIO_NET_F_CSUM the guest may leave them to the device, and this
wire is memory); ours are computed in full.
"""

from __future__ import annotations

import collections
import os
import struct
from dataclasses import dataclass, field

from ..devices.virtio.net import FrameFilter
from .guest_http import MAX_REQUEST, MmdsService

MMDS_MAC = bytes.fromhex("060123456701")   # Firecracker's MMDS MAC address
DEFAULT_IPV4 = "169.254.169.254"
HTTP_PORT = 80
MAX_CONNECTIONS = 30
OUR_MSS = 1460
DEFAULT_MSS = 536                          # RFC 9293 3.7.1, when the SYN has no option
MAX_IN_FLIGHT = 32 * 1024
OUR_WINDOW = MAX_REQUEST

ETH_ARP, ETH_IPV4 = 0x0806, 0x0800
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _seq(value: int) -> int:
    return value & 0xFFFFFFFF


def _between(low: int, value: int, high: int) -> bool:
    """low < value <= high in sequence space."""
    return 0 < _seq(value - low) <= _seq(high - low)


@dataclass
class Connection:
    guest_mac: bytes
    guest_ip: bytes
    guest_port: int
    rcv_nxt: int
    iss: int
    mss: int
    snd_una: int = 0
    snd_nxt: int = 0
    window: int = 0
    request: bytearray = field(default_factory=bytearray)
    out: bytes = b""                 # the response, from sequence iss + 1
    fin_wanted: bool = False         # the response is whole: FIN after it
    fin_sent: bool = False
    peer_fin: bool = False


class MmdsStack(FrameFilter):
    """The MMDS end of one NIC: ``service`` answers the HTTP requests."""

    def __init__(self, service: MmdsService, ipv4: str = DEFAULT_IPV4):
        self.service = service
        self.ip = bytes(int(part) for part in ipv4.split("."))
        self.connections: collections.OrderedDict[tuple, Connection] = \
            collections.OrderedDict()
        self.stats = collections.Counter()

    # --- the frame filter ----------------------------------------------------------------------
    def filter(self, frame: bytes) -> list[bytes] | None:
        if len(frame) < _ETH.size:
            return None
        dst, src, kind = _ETH.unpack_from(frame)
        if kind == ETH_ARP:
            return self._arp(frame, src)
        if kind != ETH_IPV4 or len(frame) < _ETH.size + _IP.size or \
                frame[_ETH.size + 16:_ETH.size + 20] != self.ip:
            return None
        self.stats["ipv4"] += 1
        try:
            return self._ipv4(frame, src)
        except _Drop as reason:
            self.stats[f"dropped: {reason}"] += 1
            return []

    def _arp(self, frame: bytes, src: bytes) -> list[bytes] | None:
        if len(frame) < _ETH.size + _ARP.size:
            return None
        htype, ptype, hlen, plen, oper, sha, spa, _tha, tpa = \
            _ARP.unpack_from(frame, _ETH.size)
        if tpa != self.ip:
            return None
        if (htype, ptype, hlen, plen, oper) != (1, ETH_IPV4, 6, 4, 1):
            return []                      # for our address, but not a request we answer
        self.stats["arp"] += 1
        reply = _ARP.pack(1, ETH_IPV4, 6, 4, 2, MMDS_MAC, self.ip, sha, spa)
        return [_ETH.pack(sha, MMDS_MAC, ETH_ARP) + reply]

    def _ipv4(self, frame: bytes, src_mac: bytes) -> list[bytes]:
        start = _ETH.size
        (ver_ihl, _tos, total, _ident, flags_frag, _ttl, proto, _csum, src_ip,
         _dst) = _IP.unpack_from(frame, start)
        ihl = (ver_ihl & 0x0F) * 4
        if ver_ihl >> 4 != 4 or ihl < _IP.size or total < ihl or start + total > len(frame):
            raise _Drop("bad IPv4 header")
        if flags_frag & 0x3FFF:
            raise _Drop("fragment")
        if proto != 6:
            raise _Drop("not TCP")
        segment = frame[start + ihl:start + total]
        if len(segment) < _TCP.size:
            raise _Drop("short TCP header")
        sport, dport, seq, ack, offset, flags, window, _c, _u = _TCP.unpack_from(segment)
        header = (offset >> 4) * 4
        if header < _TCP.size or header > len(segment):
            raise _Drop("bad TCP data offset")
        data = segment[header:]
        key = (src_ip, sport)
        if flags & RST:
            self.connections.pop(key, None)
            return []
        reset = self._reset(src_mac, src_ip, sport, dport, seq, ack, flags, len(data))
        if dport != HTTP_PORT:
            return [reset]
        conn = self.connections.get(key)
        if flags & SYN and not flags & ACK:
            return self._syn(conn, key, src_mac, src_ip, sport, seq, window,
                             segment[_TCP.size:header])
        if conn is None or not flags & ACK:
            return [reset] if conn is None else []
        self.connections.move_to_end(key)
        return self._segment(key, conn, seq, ack, flags, window, data)

    # --- TCP -----------------------------------------------------------------------------------------
    def _syn(self, conn, key, mac, ip, port, seq, window, options) -> list[bytes]:
        if conn is not None and conn.rcv_nxt == _seq(seq + 1) and conn.snd_una == conn.iss:
            return [self._emit(conn, conn.iss, SYN | ACK, mss=True)]   # a retransmitted SYN
        self.connections.pop(key, None)
        if len(self.connections) >= MAX_CONNECTIONS:
            self.connections.popitem(last=False)          # the least recently active
            self.stats["evicted"] += 1
        iss = int.from_bytes(os.urandom(4), "little")
        conn = Connection(mac, ip, port, rcv_nxt=_seq(seq + 1), iss=iss,
                          mss=min(_mss_option(options), OUR_MSS), snd_una=iss,
                          snd_nxt=_seq(iss + 1), window=window)
        self.connections[key] = conn
        self.stats["connections"] += 1
        return [self._emit(conn, iss, SYN | ACK, mss=True)]

    def _segment(self, key, conn: Connection, seq, ack, flags, window, data) -> list[bytes]:
        out: list[bytes] = []
        if not _between(conn.snd_una, ack, conn.snd_nxt) and ack != conn.snd_una:
            return [self._emit(conn, conn.snd_nxt, ACK)]   # acknowledges what we never sent
        duplicate = ack == conn.snd_una and not data and not flags & FIN
        conn.snd_una, conn.window = ack, window
        if seq != conn.rcv_nxt:
            if not (data or flags & FIN):
                return out
            if _seq(conn.rcv_nxt - seq) < 1 << 31 and conn.snd_una != conn.snd_nxt:
                self._rewind(conn)        # a retransmission of what we have: ours got lost
                sent = self._pump(conn)
                if sent:
                    return sent
            return [self._emit(conn, conn.snd_nxt, ACK)]    # not in order: tell it
        if data and not conn.peer_fin:
            if len(conn.request) + len(data) > MAX_REQUEST or conn.fin_wanted:
                self.connections.pop(key, None)
                return [self._emit(conn, conn.snd_nxt, RST | ACK)]
            conn.request += data
            conn.rcv_nxt = _seq(conn.rcv_nxt + len(data))
            if not conn.fin_wanted:
                reply, _used = self.service.answer(bytes(conn.request))
                if reply is not None:
                    conn.out, conn.fin_wanted = reply, True
                    conn.request.clear()
        if flags & FIN and not conn.peer_fin:
            conn.peer_fin = True
            conn.rcv_nxt = _seq(conn.rcv_nxt + 1)
            conn.fin_wanted = True         # the guest is done: answer what we have, close
        if conn.fin_sent and conn.snd_una == conn.snd_nxt and conn.peer_fin:
            self.connections.pop(key, None)
            return [self._emit(conn, conn.snd_nxt, ACK)] if flags & FIN else []
        if duplicate and conn.snd_una != conn.snd_nxt:
            self._rewind(conn)
        sent = self._pump(conn)
        if not sent and (data or flags & FIN):
            sent = [self._emit(conn, conn.snd_nxt, ACK)]
        return out + sent

    def _rewind(self, conn: Connection) -> None:
        """Send again from the first unacknowledged byte (and the FIN after it)."""
        conn.snd_nxt = conn.snd_una
        if conn.fin_sent and self._sent(conn) <= len(conn.out):
            conn.fin_sent = False

    def _sent(self, conn: Connection) -> int:
        """Bytes of ``out`` sent so far (snd_nxt relative to the first data byte)."""
        return _seq(conn.snd_nxt - conn.iss - 1)

    def _pump(self, conn: Connection) -> list[bytes]:
        frames = []
        limit = min(conn.window, MAX_IN_FLIGHT)
        while True:
            offset = self._sent(conn)
            if offset >= len(conn.out):
                break
            in_flight = _seq(conn.snd_nxt - conn.snd_una)
            room = limit - in_flight
            if room <= 0:
                return frames
            chunk = conn.out[offset:offset + min(conn.mss, room)]
            frames.append(self._emit(conn, conn.snd_nxt, ACK | PSH, chunk))
            conn.snd_nxt = _seq(conn.snd_nxt + len(chunk))
        if conn.fin_wanted and not conn.fin_sent:
            frames.append(self._emit(conn, conn.snd_nxt, FIN | ACK))
            conn.snd_nxt = _seq(conn.snd_nxt + 1)
            conn.fin_sent = True
        return frames

    # --- frames out --------------------------------------------------------------------------------
    def _emit(self, conn: Connection, seq: int, flags: int, data: bytes = b"",
              mss: bool = False) -> bytes:
        return self._frame(conn.guest_mac, conn.guest_ip, HTTP_PORT, conn.guest_port, seq,
                           conn.rcv_nxt, flags, data, mss)

    def _reset(self, mac, ip, sport, dport, seq, ack, flags, length) -> bytes:
        """RFC 9293 3.10.7.1: the RST for a segment that has no connection."""
        if flags & ACK:
            return self._frame(mac, ip, dport, sport, ack, 0, RST)
        answered = _seq(seq + length + (1 if flags & SYN else 0) + (1 if flags & FIN else 0))
        return self._frame(mac, ip, dport, sport, 0, answered, RST | ACK)

    def _frame(self, mac, ip, sport, dport, seq, ack, flags, data=b"", mss=False) -> bytes:
        options = struct.pack("!BBH", 2, 4, OUR_MSS) if mss else b""
        tcp = _TCP.pack(sport, dport, seq, ack, ((_TCP.size + len(options)) // 4) << 4,
                        flags, OUR_WINDOW, 0, 0) + options + data
        pseudo = self.ip + ip + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        header = _IP.pack(0x45, 0, _IP.size + len(tcp), 0, 0x4000, 64, 6, 0, self.ip, ip)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        return _ETH.pack(mac, MMDS_MAC, ETH_IPV4) + header + tcp


class _Drop(Exception):
    """A claimed frame that is dropped (the reason is counted in stats)."""


def _mss_option(options: bytes) -> int:
    """The MSS option of a SYN's options (RFC 9293 3.2), DEFAULT_MSS without one."""
    index = 0
    while index < len(options):
        kind = options[index]
        if kind == 0:
            break
        if kind == 1:
            index += 1
            continue
        if index + 1 >= len(options) or options[index + 1] < 2:
            break
        length = options[index + 1]
        if kind == 2 and length == 4 and index + 4 <= len(options):
            value = int.from_bytes(options[index + 2:index + 4], "big")
            return max(value, 64)
        index += length
    return DEFAULT_MSS
