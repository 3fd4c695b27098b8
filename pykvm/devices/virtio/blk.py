"""virtio-blk (virtio 1.x, section 5.2) over a raw image file.

A request is a 16-byte header (type u32, reserved u32, sector u64) in
device-readable buffers, then the data (device-readable for writes,
device-writable for reads), then one device-writable status byte. Data moves
with preadv/pwritev straight between the file and views of guest RAM: no
Python-side copy. Sectors are 512 bytes whatever the image's block size.

Host-side safety: an image is opened with an exclusive flock() (shared for a
read-only disk), so a second pykvm on the same writable image fails with a
clear error instead of corrupting it; a read-only disk answers every write with
VIRTIO_BLK_S_IOERR; a request that reaches past the image's end is an I/O error,
never a file extension.

A rate limiter (Firecracker's drive ``rate_limiter``, :meth:`BlockDevice.limit`,
devices/virtio/throttle.py) charges each request its data bytes and one op; when
the buckets are empty the requests stay in the guest's ring until a timer kicks
the queue again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

from dataclasses import dataclass

from ...errors import ImageError
from ...ioctl import libc
from ...snapshot.schema import U64
from ...snapshot.state import ComponentState, SnapshotError
from ..rate_limiter import RateLimiter
from .device import VIRTIO_ID_BLOCK, VirtioDevice
from .queue import DescriptorChain, Virtqueue, VirtqueueError, scatter, slice_views, gather
from .throttle import QueueThrottle

SECTOR_SIZE = 512
QUEUE_SIZE = 256

# --- feature bits ------------------------------------------------------------------------------
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

# --- requests ------------------------------------------------------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20

_HEADER = struct.Struct("<IIQ")
_HEADER_SIZE = _HEADER.size
_unpack_header = _HEADER.unpack_from
_preadv = os.preadv
# capacity u64, size_max u32, seg_max u32, geometry (u16, u8, u8), blk_size u32,
# topology (u8, u8, u16, u32), writeback u8, unused u8, num_queues u16
_CONFIG = struct.Struct("<QIIHBBIBBHIBBH")

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# --- flock(2), through libc: no fcntl module in pykvm ------------------------------------------
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
_flock = libc.flock
_flock.argtypes = (ctypes.c_int, ctypes.c_int)
_flock.restype = ctypes.c_int


def lock_image(fd: int, path: str, read_only: bool) -> None:
    """Shared lock for a read-only disk, exclusive otherwise; ImageError if held elsewhere."""
    if _flock(fd, (LOCK_SH if read_only else LOCK_EX) | LOCK_NB) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise ImageError(f"{path}: disk image is locked by another process "
                         f"(another pykvm using it{'' if read_only else ' or a read-only user'}?)")
    raise ImageError(f"{path}: cannot lock the disk image: {os.strerror(err)}")


def open_image(path: str, read_only: bool, *, sized: bool = True) -> tuple[int, int]:
    """(fd, size in bytes) of a raw image, opened, checked and locked. ``sized=False``:
    the size is not a disk's (a qcow2 image, which pykvm/devices/virtio/vhost_blk.py
    hands to qemu-storage-daemon)."""
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such disk image") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not a disk image") from None
    except PermissionError:
        how = "read" if read_only else "write (add ,ro for a read-only disk)"
        raise ImageError(f"{path}: no permission to {how} the disk image") from None
    except OSError as error:
        raise ImageError(f"{path}: cannot open the disk image: {error.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ImageError(f"{path}: not a regular file or block device")
        size = os.lseek(fd, 0, os.SEEK_END)
        if sized and size == 0:
            raise ImageError(f"{path}: the disk image is empty")
        if sized and size % SECTOR_SIZE:
            raise ImageError(f"{path}: disk image size {size} is not a multiple of {SECTOR_SIZE}")
        lock_image(fd, path, read_only)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


@dataclass(frozen=True)
class BlockState(ComponentState, tag="virtio-blk"):
    """Which image the disk was, and its size (the image itself is the user's: a
    restore checks it has not changed size; its path is informational)."""

    path: str
    size: U64
    read_only: bool


class BlockDevice(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str, *, read_only: bool = False, serial: str = "",
                 name: str = "virtio-blk"):
        super().__init__()
        self.name = name
        self.path = path
        self.read_only = read_only
        self.serial = serial.encode("ascii")[:VIRTIO_BLK_ID_BYTES]
        self.fd, self.size = open_image(path, read_only)
        self.features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH \
            | (VIRTIO_BLK_F_RO if read_only else 0)
        self.requests = {"read": 0, "write": 0, "flush": 0, "get_id": 0, "error": 0}
        # Firecracker's drive rate_limiter (devices/virtio/throttle.py): set by limit().
        self.throttle = QueueThrottle(lambda: self.kick(0), f"{name}-limit")

    @property
    def capacity(self) -> int:
        return self.size // SECTOR_SIZE

    def config_bytes(self) -> bytes:
        # seg_max: a request's data descriptors, leaving room for header and status.
        return _CONFIG.pack(self.capacity, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR_SIZE,
                            0, 0, 0, 0, 0, 0, 1)

    # --- requests --------------------------------------------------------------------------
    def limit(self, limiter: RateLimiter | None) -> None:
        """Serve requests within ``limiter``'s buckets (bytes of data, requests)."""
        self.throttle.set(limiter)

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        pop, add_used, handle = queue.pop, queue.add_used, self.handle
        throttle = self.throttle
        if throttle.limiter is None:            # the usual case: no rate limiter
            while (chain := pop()) is not None:
                add_used(chain.head, handle(chain))
            return
        # Limited: a request is taken only while the buckets allow; the rest stay in
        # the ring until the throttle's wake-up kicks this queue again.
        while queue.has_available() and throttle.admit():
            chain = pop()
            if chain is None:
                return
            add_used(chain.head, handle(chain))
            throttle.charge(max(0, chain.readable_len + chain.writable_len
                                - _HEADER.size - 1))

    def wants_more(self, index: int) -> bool:
        return not self.throttle.throttled    # throttled: the wake-up kicks the queue

    def handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the number of bytes written to the guest."""
        readable, writable = chain.readable, chain.writable
        if len(writable) == 2 and len(readable) == 1:
            return self._read_fast(readable[0], writable) or self._handle(chain)
        return self._handle(chain)

    def _read_fast(self, header: memoryview, writable: list[memoryview]) -> int:
        """Linux's layout of a read -- header | data | status byte, one buffer each -- is
        every request of a 4 KiB random-read load: served without :meth:`_handle`'s general
        layout work (0.3 of a request's ~2.7 µs of Python, issue #13). 0: not that layout."""
        if len(header) != _HEADER_SIZE or len(status_byte := writable[1]) != 1:
            return 0
        kind, _, sector = _unpack_header(header)
        if kind != VIRTIO_BLK_T_IN:
            return 0
        length = len(writable[0])
        status = self._transfer(_preadv, writable[:1], length, sector, "read")
        status_byte[0] = status
        if status == VIRTIO_BLK_S_OK:
            return length + 1
        self.requests["error"] += 1
        return 1

    def _handle(self, chain: DescriptorChain) -> int:
        """Any request, any layout (:meth:`handle`)."""
        readable, writable = chain.readable, chain.writable
        writable_len = sum(map(len, writable))
        if writable_len < 1:
            raise VirtqueueError(f"block request {chain.head} has no status byte")
        if readable and len(readable[0]) >= _HEADER_SIZE:      # the usual layout
            kind, _, sector = _unpack_header(readable[0])
        else:
            header = gather(readable, _HEADER_SIZE)
            if len(header) < _HEADER_SIZE:
                raise VirtqueueError(f"block request {chain.head} has a header of "
                                     f"{len(header)} bytes, not {_HEADER_SIZE}")
            kind, _, sector = _HEADER.unpack(header)
        status_byte = writable[-1]
        if len(status_byte) == 1:       # Linux's layout: the status in a descriptor of its own
            data_in = writable[:-1]
        else:
            status_byte, data_in = _split_status(writable, writable_len)
        written = 0
        if kind == VIRTIO_BLK_T_IN:
            status = self._transfer(_preadv, data_in, writable_len - 1, sector, "read")
            if status == VIRTIO_BLK_S_OK:
                written = writable_len - 1
        elif kind == VIRTIO_BLK_T_OUT:
            data_out = readable[1:] if len(readable[0]) == _HEADER.size else \
                slice_views(readable, _HEADER.size)   # the usual layout, or any other
            status = VIRTIO_BLK_S_IOERR if self.read_only else \
                self._transfer(os.pwritev, data_out, sum(map(len, data_out)), sector, "write")
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = self._flush()
        elif kind == VIRTIO_BLK_T_GET_ID:
            self.requests["get_id"] += 1
            written = scatter(data_in, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0"))
            status = VIRTIO_BLK_S_OK
        else:
            status = VIRTIO_BLK_S_UNSUPP
        if status == VIRTIO_BLK_S_IOERR:
            self.requests["error"] += 1
        status_byte[0] = status
        return written + 1

    def _transfer(self, call, views: list[memoryview], length: int, sector: int,
                  kind: str) -> int:
        """``length`` bytes between the image at ``sector`` and ``views``: one system
        call for a request of at most IOV_MAX buffers that completes at once (the usual
        case), else in IOV_MAX batches until done."""
        offset = sector * SECTOR_SIZE
        if length % SECTOR_SIZE or offset + length > self.size:
            return VIRTIO_BLK_S_IOERR
        self.requests[kind] += 1
        try:
            if len(views) <= _IOV_MAX and call(self.fd, views, offset) == length:
                return VIRTIO_BLK_S_OK
            for start in range(0, len(views), _IOV_MAX):
                batch = [v for v in views[start:start + _IOV_MAX] if len(v)]
                while batch:
                    done = call(self.fd, batch, offset)
                    if done <= 0:
                        return VIRTIO_BLK_S_IOERR   # the image shrank under us
                    offset += done
                    batch = slice_views(batch, done)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        self.requests["flush"] += 1
        if self.read_only:
            return VIRTIO_BLK_S_OK
        try:
            os.fsync(self.fd)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def save_state(self) -> BlockState:
        """A snapshot: the image is fsync'ed (what the guest was told is written is on
        the disk); the image itself is the user's and must not change until a restore."""
        if not self.read_only:
            os.fsync(self.fd)
        return BlockState(self.path, self.size, self.read_only)

    def restore_state(self, state: BlockState) -> None:
        if state.size != self.size:
            raise SnapshotError(f"{self.path}: the disk image has {self.size} bytes, "
                                f"{state.size} when the snapshot was taken: it was changed")

    def close(self) -> None:
        self.throttle.close()
        if self.fd >= 0:
            os.close(self.fd)   # also drops the flock
            self.fd = -1


def _split_status(writable: list[memoryview], total: int) -> tuple[memoryview, list[memoryview]]:
    """(the status byte, the data buffers before it): the last writable byte is the status
    (Linux's layout, the status in a descriptor of its own, :meth:`BlockDevice._handle`
    takes inline)."""
    last = writable[-1]
    if len(last) > 1:
        return last[len(last) - 1:], writable[:-1] + [last[:len(last) - 1]]
    return slice_views(writable, total - 1, 1)[0], slice_views(writable, 0, total - 1)
