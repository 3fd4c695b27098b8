"""virtio 1.x devices on the PCI transport: split virtqueues, blk, console, rng."""

from .attach import DiskSpec, VirtioDevices, attach_virtio

__all__ = ["DiskSpec", "VirtioDevices", "attach_virtio"]
