"""What a snapshot keeps of virtio's transport-neutral parts (the protocol:
pykvm/snapshot/state.py): a virtqueue's registers and indices (vm-virtio's
``QueueState``), and what both transports keep (transport.py saves it; pci.py and
mmio.py add their own fields and tags)."""

from __future__ import annotations

from dataclasses import dataclass

from ...snapshot.schema import U8, U16, U32, U64, blob
from ...snapshot.state import ComponentState


@dataclass(frozen=True)
class QueueState(ComponentState, tag="virtqueue"):
    """The driver's registers and the device's ring indices (vm-virtio's QueueState;
    the rings themselves are in guest RAM)."""

    size: U16
    desc_addr: U64
    avail_addr: U64
    used_addr: U64
    enabled: bool
    msix_vector: U16
    active: bool
    last_avail_idx: U16
    used_idx: U16
    signalled_used: U16
    indirect: bool
    event_idx: bool


MAX_CONFIG_BYTES = 4096      # a device configuration space (virtio 1.2: well under a page)


@dataclass(frozen=True)
class VirtioTransportState(ComponentState):
    """What both transports keep (each adds its own and a tag: pci.py, mmio.py): status,
    features, the queues, the interrupt status, the device configuration as the driver
    reads it (informational: it follows from the device) and the device's own state."""

    device_id: U32
    status: U8
    config_generation: U8
    device_feature_select: U32
    driver_feature_select: U32
    driver_features: U64
    queue_select: U16
    running: bool
    broken: bool
    isr: U8
    queues: tuple[QueueState, ...]
    config: blob(MAX_CONFIG_BYTES)
    device: ComponentState | None
