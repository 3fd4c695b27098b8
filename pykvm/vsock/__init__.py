"""virtio-vsock's host side: packets (packet.py), one connection's state and credit
(connection.py), Firecracker's Unix-socket convention (muxer.py) and the
``--vsock`` / ``PUT /vsock`` configuration (spec.py). The virtio device itself is
pykvm/devices/virtio/vsock.py."""

from .spec import VsockSpec

__all__ = ["VsockSpec"]
