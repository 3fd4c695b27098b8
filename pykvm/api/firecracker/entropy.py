"""Firecracker's PUT /entropy: a virtio-rng device (pykvm/devices/virtio/rng.py).

Swagger definitions EntropyDevice, RateLimiter and TokenBucket (Firecracker 1.7).
Before the start only; the device is then part of the machine (MachineConfig.rng,
and its rate limiter as MachineConfig.rng_rate_limit: token buckets for bytes and
requests, pykvm/devices/rate_limiter.py, with Firecracker's meaning of each field; a
bucket of size 0 or refill_time 0 limits nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...devices.rate_limiter import format_rate_limit, parse_rate_limit
from .resources import RateLimiter, Record, TokenBucket, spec


@dataclass(frozen=True)
class EntropyDevice(Record):
    rate_limiter: RateLimiter | None = spec(RateLimiter, None)


class EntropyApi:
    """The entropy resource of one :class:`~.vmm.Vmm`."""

    def __init__(self, vmm):
        self._vmm = vmm
        self.config: EntropyDevice | None = None

    def put(self, body) -> None:
        record = EntropyDevice.from_json(body)
        with self._vmm._lock:
            self._vmm._before_start()
            self.config = record

    @property
    def configured(self) -> bool:
        return self.config is not None

    def machine_fields(self) -> dict:
        """What InstanceStart puts in the MachineConfig (rng, rng_rate_limit)."""
        if self.config is None:
            return {}
        limiter = self.config.rate_limiter
        buckets = [None if bucket is None else
                   (bucket.size, bucket.refill_time, bucket.one_time_burst or 0)
                   for bucket in ((limiter.bandwidth, limiter.ops) if limiter else (None, None))]
        return {"rng": True, "rng_rate_limit": format_rate_limit(*buckets)}

    def describe_loaded(self, config) -> None:
        """After a snapshot load: the entropy device the loaded machine has."""
        if not config.rng:
            return
        limiter = parse_rate_limit(config.rng_rate_limit)
        buckets = {name: TokenBucket(size=b.size, refill_time=b.refill_time_ms,
                                     one_time_burst=b.one_time_burst or None)
                   for name, b in (("bandwidth", limiter and limiter.bandwidth),
                                   ("ops", limiter and limiter.ops)) if b is not None}
        self.config = EntropyDevice(rate_limiter=RateLimiter(**buckets) if buckets else None)

    def to_json(self) -> dict | None:
        """The "entropy" of GET /vm/config."""
        return self.config.to_json() if self.config is not None else None

    def routes(self) -> dict:
        return {("PUT", "/entropy"): self.put}
