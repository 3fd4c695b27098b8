"""The vhost-user wire format (QEMU docs/interop/vhost-user.rst, "Message
Specification"): what the front end (pykvm) and a back end (virtiofsd,
qemu-storage-daemon) send over their Unix stream socket.

Every message is a 12-byte header -- ``request`` (u32), ``flags`` (u32: bits 0-1
the version, 1; bit 2 REPLY; bit 3 NEED_REPLY), ``size`` (u32, the payload's
length) -- and a payload; file descriptors travel beside it as SCM_RIGHTS
ancillary data. This module only encodes and decodes; the socket and the order
of messages are pykvm/vhost_user/frontend.py's. A back end is another process:
every number it sends is checked here before anyone uses it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import VhostUserError

__all__ = ["VhostUserError"]   # re-exported: the codec's callers catch it


class Request(enum.IntEnum):
    """Front-end requests (the spec's "Front-end message types")."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25


VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# Virtio feature bit 30 in GET/SET_FEATURES: the back end speaks protocol features
# (and then rings start disabled until SET_VRING_ENABLE).
F_PROTOCOL_FEATURES = 1 << 30
# Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
# What pykvm's front end implements; it asks for the intersection with the back end's.
SUPPORTED_PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG

# SET_VRING_KICK/CALL/ERR payload: bits 0-7 the queue index, bit 8 "no fd passed".
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

MAX_MEM_REGIONS = 8                 # SET_MEM_TABLE's fixed array (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_PAYLOAD = 0x1000                # no reply pykvm asks for is longer: bounded receive
MAX_CONFIG = 0x100                  # GET_CONFIG: a device config space pykvm reads
MAX_FDS = MAX_MEM_REGIONS           # SET_MEM_TABLE carries one fd per region

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")              # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")           # index, flags, desc, used, avail, log
MEMORY_HEADER = struct.Struct("<II")            # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")          # guest addr, size, user addr, mmap offset
CONFIG_HEADER = struct.Struct("<III")           # offset, size, flags


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @classmethod
    def decode(cls, data: bytes) -> "Header":
        if len(data) != HEADER.size:
            raise VhostUserError(f"short message header ({len(data)} of {HEADER.size} bytes)")
        header = cls(*HEADER.unpack(data))
        if header.flags & FLAG_VERSION_MASK != VERSION:
            raise VhostUserError(f"message version {header.flags & FLAG_VERSION_MASK}, not 1")
        if header.size > MAX_PAYLOAD:
            raise VhostUserError(f"message of {header.size} bytes (at most {MAX_PAYLOAD})")
        return header


@dataclass(frozen=True)
class MemoryRegion:
    """One SET_MEM_TABLE entry: guest RAM at ``guest_addr`` is ``size`` bytes at
    ``mmap_offset`` in the fd sent with it, mapped in pykvm at ``user_addr``."""
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def encode(request: int, payload: bytes = b"", *, need_reply: bool = False,
           reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0) | (FLAG_REPLY if reply else 0)
    return HEADER.pack(int(request), flags, len(payload)) + payload


def u64(value: int) -> bytes:
    return U64.pack(value & 0xFFFFFFFFFFFFFFFF)


def decode_u64(payload: bytes, what: str) -> int:
    if len(payload) != U64.size:
        raise VhostUserError(f"{what}: a reply of {len(payload)} bytes, not 8")
    return U64.unpack(payload)[0]


def vring_state(index: int, num: int) -> bytes:
    return VRING_STATE.pack(index, num)


def decode_vring_state(payload: bytes, index: int) -> int:
    """GET_VRING_BASE's reply: the back end's next available index for ``index``."""
    if len(payload) != VRING_STATE.size:
        raise VhostUserError(f"GET_VRING_BASE: a reply of {len(payload)} bytes, not 8")
    got, num = VRING_STATE.unpack(payload)
    if got != index:
        raise VhostUserError(f"GET_VRING_BASE: the reply is for queue {got}, not {index}")
    return num & 0xFFFF


def vring_addr(index: int, desc: int, used: int, avail: int) -> bytes:
    """User (pykvm-process) addresses of the ring's three parts; no dirty log."""
    return VRING_ADDR.pack(index, 0, desc, used, avail, 0)


def vring_fd(index: int, has_fd: bool) -> bytes:
    return u64((index & VRING_INDEX_MASK) | (0 if has_fd else VRING_NOFD))


def memory_table(regions: list[MemoryRegion]) -> bytes:
    if not 1 <= len(regions) <= MAX_MEM_REGIONS:
        raise VhostUserError(f"{len(regions)} memory regions (1 to {MAX_MEM_REGIONS})")
    body = MEMORY_HEADER.pack(len(regions), 0)
    for region in regions:
        body += MEMORY_REGION.pack(region.guest_addr, region.size, region.user_addr,
                                   region.mmap_offset)
    return body.ljust(MEMORY_HEADER.size + MAX_MEM_REGIONS * MEMORY_REGION.size, b"\0")


def decode_memory_table(payload: bytes) -> list[MemoryRegion]:
    """For test back ends: the regions of a SET_MEM_TABLE payload."""
    count, _ = MEMORY_HEADER.unpack_from(payload)
    if count > MAX_MEM_REGIONS or len(payload) < MEMORY_HEADER.size + count * MEMORY_REGION.size:
        raise VhostUserError(f"SET_MEM_TABLE with {count} regions in {len(payload)} bytes")
    return [MemoryRegion(*MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size
                                                    + i * MEMORY_REGION.size))
            for i in range(count)]


def config_request(offset: int, size: int) -> bytes:
    """GET_CONFIG: the header and ``size`` zero bytes the back end fills in."""
    return CONFIG_HEADER.pack(offset, size, 0) + bytes(size)


def decode_config(payload: bytes, offset: int, size: int) -> bytes:
    if len(payload) != CONFIG_HEADER.size + size:
        raise VhostUserError(f"GET_CONFIG: a reply of {len(payload)} bytes, "
                             f"not {CONFIG_HEADER.size + size}")
    got_offset, got_size, _ = CONFIG_HEADER.unpack_from(payload)
    if (got_offset, got_size) != (offset, size):
        raise VhostUserError(f"GET_CONFIG: the reply is for {got_size} bytes at {got_offset}")
    return payload[CONFIG_HEADER.size:]
