"""virtio-fs (virtio 1.2, section 5.11): a host directory the guest mounts with
``mount -t virtiofs TAG DIR``, served by virtiofsd over vhost-user.

pykvm owns only the device's identity and config -- ``tag`` (36 bytes, UTF-8,
NUL-padded) and ``num_request_queues`` (le32) -- and the transport; the FUSE
requests on the hiprio queue (0) and the request queues (1..) go to the back end.
``--share DIR[,ro][,tag=T]`` starts virtiofsd (pykvm/vhost_user/daemon.py);
``--vhost-user-fs SOCKET,tag=T`` attaches one the user runs.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ...errors import ConfigError
from ...vhost_user.device import VhostUserDevice

VIRTIO_ID_FS = 26
TAG_BYTES = 36
QUEUE_SIZE = 128
REQUEST_QUEUES = 1
_TAG = re.compile(r"^[A-Za-z0-9._-]{1,%d}$" % TAG_BYTES)


def default_tag(index: int) -> str:
    return "pykvm-share" if index == 0 else f"pykvm-share{index}"


def mount_point(index: int) -> str:
    """Where the default guest mounts virtio-fs device ``index``: /mnt/share, /mnt/share1..."""
    return "/mnt/share" if index == 0 else f"/mnt/share{index}"


@dataclass(frozen=True)
class FsSpec:
    """A live share: ``source`` is a directory pykvm serves with its own virtiofsd,
    ``socket`` a running back end's socket (exactly one of them)."""
    tag: str
    source: str = ""
    socket: str = ""
    read_only: bool = False

    @classmethod
    def parse_share(cls, text: str, index: int) -> "FsSpec":
        """``--share DIR[,ro][,tag=T]``."""
        path, options = _split(text, "--share", "DIR[,ro][,tag=T]")
        tag, read_only = default_tag(index), False
        for option in options:
            if option == "ro":
                read_only = True
            elif option == "rw":
                read_only = False
            elif option.startswith("tag="):
                tag = _check_tag(option[4:], text, "--share")
            else:
                raise ConfigError(f"--share {text!r}: unknown option {option!r} "
                                  f"(use DIR[,ro][,tag=T])")
        return cls(tag, source=path, read_only=read_only)

    @classmethod
    def parse_socket(cls, text: str) -> "FsSpec":
        """``--vhost-user-fs SOCKET,tag=T``."""
        path, options = _split(text, "--vhost-user-fs", "SOCKET,tag=T")
        tags = [option[4:] for option in options if option.startswith("tag=")]
        if len(tags) != 1 or len(options) != 1:
            raise ConfigError(f"--vhost-user-fs {text!r}: use SOCKET,tag=T")
        return cls(_check_tag(tags[0], text, "--vhost-user-fs"), socket=path)


def _split(text: str, option: str, usage: str) -> tuple[str, list[str]]:
    path, *options = text.split(",")
    if not path:
        raise ConfigError(f"{option} {text!r}: no path (use {usage})")
    return path, options


def _check_tag(tag: str, text: str, option: str) -> str:
    if not _TAG.match(tag):
        raise ConfigError(f"{option} {text!r}: a tag is 1 to {TAG_BYTES} letters, digits, "
                          f"'.', '_' or '-'")
    return tag


class FsDevice(VhostUserDevice):
    device_id = VIRTIO_ID_FS
    snapshot_kind = "a live share (--share DIR, --vhost-user-fs)"
    snapshot_hint = " (use --share DIR,copy)"
    queue_sizes = (QUEUE_SIZE,) * (1 + REQUEST_QUEUES)     # hiprio, then the request queue

    def __init__(self, frontend, tag: str, *, daemon=None, name: str = "virtio-fs"):
        super().__init__(frontend, daemon)
        self.tag = tag
        self.name = name

    def config_bytes(self) -> bytes:
        """struct virtio_fs_config (5.11.4)."""
        return self.tag.encode().ljust(TAG_BYTES, b"\0") + struct.pack("<I", REQUEST_QUEUES)


def open_fs_devices(specs) -> list[FsDevice]:
    """Start (or connect to) each share's back end; on failure nothing is left running."""
    from ...vhost_user.daemon import start_virtiofsd
    from ...vhost_user.frontend import Frontend

    devices: list[FsDevice] = []
    try:
        for index, spec in enumerate(specs):
            name = f"virtio-fs{index}"
            daemon = start_virtiofsd(spec.source, read_only=spec.read_only, name=name) \
                if spec.source else None
            try:
                frontend = Frontend.connect(daemon.socket_path if daemon else spec.socket, name)
            except BaseException:
                if daemon is not None:
                    daemon.stop()
                raise
            if daemon is not None:
                daemon.connected()
            devices.append(FsDevice(frontend, spec.tag, daemon=daemon, name=name))
    except BaseException:
        for device in devices:
            device.close()
        raise
    return devices
