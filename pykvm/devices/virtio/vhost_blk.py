"""virtio-blk (virtio 1.2, section 5.2) served by another process over vhost-user:
qemu-storage-daemon, which pykvm starts for ``--disk IMG.qcow2`` and
``--disk IMG,backend=vhost-user``, or a running back end, ``--disk vhost-user=SOCKET``.

pykvm keeps the transport and the device's identity; the requests -- reads,
writes, flushes, GET_ID -- go from the guest's ring straight to the daemon, which
reads and writes guest RAM itself (pykvm/vhost_user). So pykvm can serve images it
cannot read itself (qcow2), and no byte of a request passes through Python.

- **Format by content, not name** (:func:`image_format`): the qcow2 magic
  ``QFI\\xfb`` (qcow2 spec, "Header") makes a qcow2 disk, anything else a raw one.
  ``format=raw`` turns the probe off: a guest that can write a raw disk's first
  sector could otherwise make it look like a qcow2 image at the next start (QEMU's
  old format-probing hole). A qcow2 image that names another file -- a backing file,
  or an external data file (incompatible feature bit 2) -- is refused: it would
  give the guest a host file nobody named on the command line.
- **The daemon serves pykvm's own fd** (/proc/self/fd/N): the file pykvm opened,
  probed and locked (the flock of pykvm/devices/virtio/blk.py: shared for a
  read-only disk, exclusive otherwise), whatever happens to the path meanwhile.
- **Config** (5.2.4): read once from the back end with GET_CONFIG -- capacity,
  size_max, seg_max, blk_size, topology -- and shown to the driver as it is.
- **Read-only** is the daemon's: its block nodes are opened read-only and its
  export is not writable, so a write fails there (VIRTIO_BLK_S_IOERR) whatever the
  driver does; the driver is also offered VIRTIO_BLK_F_RO. A running back end
  attached with ``ro`` must offer VIRTIO_BLK_F_RO itself, or it is refused.
- **Flush**: VIRTIO_BLK_F_FLUSH, and the daemon's cache is the page cache with an
  fsync per flush (cache.direct=off, cache.no-flush=off): pykvm's own semantics.
- **Serial**: qemu-storage-daemon 7.2 answers GET_ID itself (``vhost_user_blk``,
  not settable), so ``serial=`` is refused on these disks rather than ignored.

Features the driver may see: these device bits where the back end offers them,
plus the transport's (VERSION_1, INDIRECT_DESC, EVENT_IDX). Not CONFIG_WCE (its
writeback field would need SET_CONFIG), not MQ (one queue), not DISCARD or
WRITE_ZEROES (pykvm's own virtio-blk has neither; a disk behaves the same
whichever process serves it).
"""

from __future__ import annotations

import os
import stat
import struct

from ...errors import ConfigError, ImageError
from ...vhost_user.device import VhostUserDevice
from ...vhost_user.protocol import VhostUserError
from .blk import (QUEUE_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
                  VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, open_image)
from .device import VIRTIO_ID_BLOCK

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_TOPOLOGY = 1 << 10
DEVICE_FEATURES = (VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_RO
                   | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_TOPOLOGY)
# struct virtio_blk_config up to write_zeroes_may_unmap and its padding (virtio 1.2 5.2.4):
# what QEMU 7.2's front end asks a vhost-user-blk back end for.
CONFIG_SIZE = 60

QCOW2_MAGIC = b"QFI\xfb"
# qcow2 header (QEMU docs/interop/qcow2.txt): magic, version u32, backing_file_offset u64,
# backing_file_size u32, ...; version 3 adds incompatible_features u64 at byte 72.
_QCOW2_HEADER = struct.Struct(">4sIQI")
_QCOW2_INCOMPATIBLE = struct.Struct(">Q")
QCOW2_INCOMPATIBLE_OFFSET = 72
QCOW2_EXTERNAL_DATA_FILE = 1 << 2
FORMATS = ("raw", "qcow2")


def image_format(fd: int, path: str) -> str:
    """The format of the image at ``fd``: "qcow2" if it starts with the qcow2 magic, else "raw"; a qcow2
    image that names another file (backing or external data file) is an ImageError."""
    try:
        header = os.pread(fd, QCOW2_INCOMPATIBLE_OFFSET + _QCOW2_INCOMPATIBLE.size, 0)
    except OSError as error:
        raise ImageError(f"{path}: cannot read the image: {error.strerror}") from None
    if not header.startswith(QCOW2_MAGIC):
        return "raw"
    if len(header) < QCOW2_INCOMPATIBLE_OFFSET + _QCOW2_INCOMPATIBLE.size:
        raise ImageError(f"{path}: a qcow2 header of {len(header)} bytes (truncated image?)")
    _, version, backing_offset, backing_size = _QCOW2_HEADER.unpack_from(header)
    if version not in (2, 3):
        raise ImageError(f"{path}: qcow2 version {version} (2 or 3 are known)")
    if backing_offset:
        raise ImageError(f"{path}: the qcow2 image has a backing file, which pykvm does not "
                         f"open (flatten it: qemu-img convert -O qcow2 {path} NEW.qcow2)")
    if version == 3 and _QCOW2_INCOMPATIBLE.unpack_from(
            header, QCOW2_INCOMPATIBLE_OFFSET)[0] & QCOW2_EXTERNAL_DATA_FILE:
        raise ImageError(f"{path}: the qcow2 image keeps its data in an external file, "
                         f"which pykvm does not open")
    return "qcow2"


def probe_format(path: str) -> str:
    """The format :func:`image_format` finds at ``path`` ("raw" when unreadable: the
    open that follows says why)."""
    try:    # O_NONBLOCK: a FIFO given as a disk must not hang pykvm here
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return "raw"
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            return "raw"
        return image_format(fd, path)
    finally:
        os.close(fd)


def served_by_vhost_user(spec) -> bool:
    """Whether a vhost-user back end serves the disk of ``spec`` (a DiskSpec): asked for
    (``backend=vhost-user``), a running one (``vhost-user=SOCKET``), or a qcow2 image --
    found by content unless ``format=`` says."""
    if spec.socket or spec.backend:
        return bool(spec.socket) or spec.backend == "vhost-user"
    if spec.format:
        return spec.format == "qcow2"
    return probe_format(spec.path) == "qcow2"


class VhostBlkDevice(VhostUserDevice):
    device_id = VIRTIO_ID_BLOCK
    queue_sizes = (QUEUE_SIZE,)
    device_features = DEVICE_FEATURES
    snapshot_kind = "a vhost-user disk (qcow2, backend=vhost-user, vhost-user=SOCKET)"
    snapshot_hint = " (a raw image on pykvm's own virtio-blk can be snapshotted)"

    def __init__(self, frontend, *, read_only: bool = False, daemon=None,
                 name: str = "virtio-blk", image_fd: int = -1):
        """``frontend`` connected to the back end; ``image_fd``: the image pykvm opened
        and locked for ``daemon`` (closed with the device, which drops the lock)."""
        if read_only and not frontend.features & VIRTIO_BLK_F_RO:
            raise VhostUserError(f"{name}: ro asked for, but the back end's export is "
                                 f"writable (it does not offer VIRTIO_BLK_F_RO)")
        self.config = frontend.get_config(0, CONFIG_SIZE)
        self.capacity = struct.unpack_from("<Q", self.config)[0]
        if not 0 < self.capacity < 1 << 55:
            raise VhostUserError(f"{name}: the back end reports a capacity of "
                                 f"{self.capacity} sectors")
        super().__init__(frontend, daemon)
        self.name = name
        self.read_only = bool(frontend.features & VIRTIO_BLK_F_RO)
        self.image_fd = image_fd

    @property
    def size(self) -> int:
        return self.capacity * SECTOR_SIZE

    def config_bytes(self) -> bytes:
        return self.config

    def close(self) -> None:
        super().close()
        if self.image_fd >= 0:
            os.close(self.image_fd)
            self.image_fd = -1


def open_vhost_blk(spec, name: str) -> VhostBlkDevice:
    """The disk of ``spec`` (a DiskSpec) served over vhost-user: a running back end at
    ``spec.socket``, or qemu-storage-daemon started for ``spec.path``. On failure
    nothing is left running or open."""
    from ...vhost_user.daemon import start_storage_daemon
    from ...vhost_user.frontend import Frontend

    if spec.serial:
        raise ConfigError(f"--disk {spec.path or spec.socket}: serial= cannot be set on a "
                          f"vhost-user disk (qemu-storage-daemon answers GET_ID itself)")
    if spec.socket:
        frontend = Frontend.connect(spec.socket, name)
        try:
            return VhostBlkDevice(frontend, read_only=spec.read_only, name=name)
        except BaseException:
            frontend.close()
            raise
    fd, size = open_image(spec.path, spec.read_only, sized=False)
    try:
        driver = spec.format or image_format(fd, spec.path)
        if driver == "raw" and (size == 0 or size % SECTOR_SIZE):
            raise ImageError(f"{spec.path}: a raw image of {size} bytes (a disk is a "
                             f"positive multiple of {SECTOR_SIZE})")
        daemon = start_storage_daemon(fd, driver, read_only=spec.read_only, name=name)
        try:
            frontend = Frontend.connect(daemon.socket_path, name)
            daemon.connected()
            try:
                return VhostBlkDevice(frontend, read_only=spec.read_only, daemon=daemon,
                                      name=name, image_fd=fd)
            except BaseException:
                frontend.close()
                raise
        except BaseException:
            daemon.stop()
            raise
    except BaseException:
        os.close(fd)
        raise
