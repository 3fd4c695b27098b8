"""MMDS, Firecracker's microVM Metadata Service: a JSON data store the host fills
(PUT/PATCH /mmds) and the guest reads over HTTP at a link-local address
(169.254.169.254 by default) on the NICs it is configured for.

- store.py: the data store (PUT replaces, PATCH is an RFC 7396 merge patch, a size
  bound), its IMDS and JSON renderings, and V2's session tokens.
- guest_http.py: the guest-facing HTTP/1.1 requests and responses (V1, V2).
- stack.py: the minimal in-VMM network stack (ARP, IPv4, TCP) a NIC's frame filter
  runs (pykvm/devices/virtio/net.py's FrameFilter): frames to the MMDS address never
  reach the TAP or passt; the replies go into the guest's receive queue.

docs/mmds.md is the user's page; Firecracker's docs/mmds/mmds-user-guide.md defines
the formats followed here.
"""

from .store import MetadataStore, TokenAuthority  # noqa: F401
