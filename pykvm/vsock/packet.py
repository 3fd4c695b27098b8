"""The virtio-vsock packet header (virtio 1.2, section 5.10.6) and its checks.

Every packet on the receive and transmit queues starts with this 44-byte,
little-endian header; an RW packet's payload (``len`` bytes) follows it::

    le64 src_cid   le64 dst_cid   le32 src_port   le32 dst_port   le32 len
    le16 type      le16 op        le32 flags      le32 buf_alloc  le32 fwd_cnt

``buf_alloc`` and ``fwd_cnt`` ride on every packet: they are the sender's credit
(5.10.6.3): how much the receiving socket may buffer in all, and how much of what
it received it has passed on. A sender may have at most
``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes in flight.

The header comes from the guest, so :func:`check` says what is wrong with one
before any field is used: a packet that fails it never reaches a connection's
state machine (the muxer resets the connection it names instead).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HOST_CID = 2                   # VMADDR_CID_HOST: the only peer a guest reaches here
MIN_GUEST_CID = 3              # 0, 1 and 2 are reserved (vsock(7)); Firecracker's minimum too
MAX_GUEST_CID = 0xFFFF_FFFE    # 0xFFFFFFFF is VMADDR_CID_ANY; Linux keeps CIDs in 32 bits

TYPE_STREAM = 1                # the only type offered (no VIRTIO_VSOCK_F_SEQPACKET)

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {OP_REQUEST: "REQUEST", OP_RESPONSE: "RESPONSE", OP_RST: "RST",
            OP_SHUTDOWN: "SHUTDOWN", OP_RW: "RW", OP_CREDIT_UPDATE: "CREDIT_UPDATE",
            OP_CREDIT_REQUEST: "CREDIT_REQUEST"}

SHUTDOWN_RCV = 1               # the sender will receive no more
SHUTDOWN_SEND = 2              # the sender will send no more
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

EVENT_TRANSPORT_RESET = 0      # struct virtio_vsock_event { le32 id; } (5.10.6.5)

HEADER_SIZE = 44
# The most payload one packet carries. Linux sends at most 64 KiB per packet
# (VIRTIO_VSOCK_MAX_PKT_BUF_SIZE) and fills its receive queue with 4 KiB buffers;
# a longer "packet" from the guest is a hostile one.
MAX_PAYLOAD = 64 * 1024

_HEADER = struct.Struct("<QQIIIHHIII")
assert _HEADER.size == HEADER_SIZE


@dataclass(slots=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        """From exactly HEADER_SIZE bytes (read once: the guest cannot change it after)."""
        return cls(*_HEADER.unpack(data))

    def pack(self) -> bytes:
        return _HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port,
                            self.len, self.type, self.op, self.flags,
                            self.buf_alloc & 0xFFFF_FFFF, self.fwd_cnt & 0xFFFF_FFFF)

    def describe(self) -> str:
        return (f"{OP_NAMES.get(self.op, f'op {self.op}')} {self.src_cid}:{self.src_port} -> "
                f"{self.dst_cid}:{self.dst_port} len {self.len}")


def check(header: Header, guest_cid: int, payload: int) -> str | None:
    """Why a packet the guest sent cannot be served (None if it can). ``payload`` is
    how many bytes the chain has after the header. The caller resets the connection
    the header names (an RST of its own ports), it never goes further."""
    if header.src_cid != guest_cid:
        return f"source CID {header.src_cid} is not the guest's ({guest_cid})"
    if header.dst_cid != HOST_CID:
        return f"destination CID {header.dst_cid} is not the host ({HOST_CID})"
    if header.type != TYPE_STREAM:
        return f"socket type {header.type} (only stream, {TYPE_STREAM}, is offered)"
    if header.op not in OP_NAMES:
        return f"unknown operation {header.op}"
    if header.op == OP_RW:
        if not 0 < header.len <= MAX_PAYLOAD:
            return f"RW of {header.len} bytes (1 to {MAX_PAYLOAD})"
        if header.len > payload:
            return f"RW says {header.len} bytes, the buffers hold {payload}"
    elif header.len:
        return f"{OP_NAMES[header.op]} with a payload of {header.len} bytes"
    if header.op == OP_SHUTDOWN and header.flags & ~SHUTDOWN_BOTH:
        return f"SHUTDOWN flags {header.flags:#x}"
    return None
