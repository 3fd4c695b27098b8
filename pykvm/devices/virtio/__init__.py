"""virtio 1.x devices on the PCI transport: split virtqueues, blk, console, rng."""

from ...lazy import lazy_exports

_EXPORTS = {name: ".attach" for name in ("DiskSpec", "VirtioDevices", "attach_virtio")}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
