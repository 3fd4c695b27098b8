"""virtio-net's numbers (virtio 1.2 section 5.1): the device id and queue indices
(5.1.1, 5.1.2), the feature bits (5.1.3), the configuration layout's status bit
(5.1.4), the virtio_net_hdr_v1 every frame starts with (5.1.6), and the TUN offload
flags the TAP is told (linux/if_tun.h, TUNSETOFFLOAD).

Why a module of its own: both halves of the device (pykvm/devices/virtio/net.py:
transmit, negotiation, the wire; net_receive.py: filling the guest's receive
buffers) and the tests speak these numbers; pykvm.devices.virtio.net re-exports
them, so ``from pykvm.devices.virtio.net import NET_HDR_SIZE`` keeps working.
"""

from __future__ import annotations

VIRTIO_ID_NET = 1
RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
QUEUE_SIZE = 256

# --- feature bits (section 5.1.3) ---------------------------------------------------------
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_GUEST_ECN = 1 << 9
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_HOST_ECN = 1 << 13
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16

VIRTIO_NET_S_LINK_UP = 1

BASIC_FEATURES = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU | VIRTIO_NET_F_MRG_RXBUF
OFFLOAD_FEATURES = (VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
                    | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN
                    | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN)

# --- the header and the TAP --------------------------------------------------------------------
NET_HDR_SIZE = 12               # virtio_net_hdr_v1 (VERSION_1: num_buffers always present)
NUM_BUFFERS_OFFSET = 10
ETH_HEADER = 14 + 4             # Ethernet header with one VLAN tag
MAX_GSO_FRAME = NET_HDR_SIZE + ETH_HEADER + 65535
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
