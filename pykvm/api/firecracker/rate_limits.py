"""Firecracker's ``rate_limiter`` on drives and ``rx_rate_limiter``/``tx_rate_limiter``
on network interfaces, applied to pykvm's virtio-blk and virtio-net
(pykvm/devices/virtio/throttle.py).

InstanceStart gives each device the limiter of its PUT body. PATCH /drives/{id} and
PATCH /network-interfaces/{id} update a running device with Firecracker's meaning
(``BucketUpdate``): a bucket the body gives replaces the device's (size or
refill_time 0 turns it off), a bucket it leaves out keeps its state and tokens. A
drive served over vhost-user (a qcow2 image: qemu-storage-daemon moves its data, not
pykvm) cannot be limited: its rate_limiter is refused at InstanceStart and PATCH.
"""

from __future__ import annotations

from ...devices.rate_limiter import RateLimiter as DeviceLimiter
from ...devices.virtio.throttle import KEEP, QueueThrottle, bucket
from .resources import ApiFault, RateLimiter, TokenBucket


def _bucket(record: TokenBucket | None):
    if record is None:
        return None
    return bucket(record.size, record.refill_time, record.one_time_burst or 0)


def device_limiter(record: RateLimiter | None) -> DeviceLimiter | None:
    """The device-side limiter of a PUT body's RateLimiter (None: no limit)."""
    if record is None:
        return None
    limiter = DeviceLimiter(bandwidth=_bucket(record.bandwidth), ops=_bucket(record.ops))
    return limiter if limiter.buckets else None


def patch_throttle(throttle: QueueThrottle, record: RateLimiter | None) -> None:
    """A PATCH body's RateLimiter onto a running queue: only the buckets it names."""
    if record is None:
        return
    throttle.update(bandwidth=KEEP if record.bandwidth is None else _bucket(record.bandwidth),
                    ops=KEEP if record.ops is None else _bucket(record.ops))


def merged(old: RateLimiter | None, new: RateLimiter | None) -> RateLimiter | None:
    """What GET /vm/config shows after a PATCH: the buckets given replace the old."""
    if new is None:
        return old
    if old is None:
        return new
    return RateLimiter(bandwidth=new.bandwidth or old.bandwidth, ops=new.ops or old.ops)


def block_throttle(device, drive_id: str) -> QueueThrottle:
    """The throttle of a drive's device; ApiFault for one pykvm does not serve itself."""
    throttle = getattr(device, "throttle", None)
    if not isinstance(throttle, QueueThrottle):
        raise ApiFault(f"drive {drive_id}: rate_limiter: the drive is served over "
                       f"vhost-user (a qcow2 image), which pykvm cannot rate-limit")
    return throttle


def apply_at_start(drives, nets, virtio) -> None:
    """InstanceStart: each drive's and NIC's limiter onto its device (``drives`` in
    the order of the machine's disks, ``nets`` in the order of its NICs)."""
    if virtio is None:
        return
    for drive, device in zip(drives, virtio.disks):
        if drive.rate_limiter is not None:
            block_throttle(device, drive.drive_id).set(device_limiter(drive.rate_limiter))
    for nic, device in zip(nets, virtio.nets):
        device.rx_throttle.set(device_limiter(nic.rx_rate_limiter))
        device.tx_throttle.set(device_limiter(nic.tx_rate_limiter))
