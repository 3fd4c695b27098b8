"""Firecracker's PUT /entropy: a virtio-rng device (pykvm/devices/virtio/rng.py).

Swagger definitions EntropyDevice, RateLimiter and TokenBucket (Firecracker 1.7).
Before the start only; the device is then part of the machine (MachineConfig.rng).
The rate limiter is read strictly (its shape, non-negative sizes and times) and
shown again by GET /vm/config, but pykvm has no token buckets yet: the guest's
reads are bounded per request (64 KiB, rng.py), not in rate. docs/firecracker.md
says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from .resources import Record, spec


@dataclass(frozen=True)
class TokenBucket(Record):
    size: int = spec(int)
    one_time_burst: int | None = spec(int, None)
    refill_time: int = spec(int)


@dataclass(frozen=True)
class RateLimiter(Record):
    bandwidth: TokenBucket | None = spec(TokenBucket, None)
    ops: TokenBucket | None = spec(TokenBucket, None)


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
            if record.rate_limiter is not None and (record.rate_limiter.bandwidth or
                                                    record.rate_limiter.ops):
                self._vmm.log.log("Warning", "PUT /entropy: the rate limiter is recorded but "
                                  "not enforced by pykvm (docs/firecracker.md)")

    @property
    def configured(self) -> bool:
        return self.config is not None

    def to_json(self) -> dict | None:
        """The "entropy" of GET /vm/config."""
        return self.config.to_json() if self.config is not None else None

    def routes(self) -> dict:
        return {("PUT", "/entropy"): self.put}
