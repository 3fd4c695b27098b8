"""Firecracker's /balloon and /balloon/statistics over pykvm's virtio-balloon
(pykvm/devices/virtio/balloon.py).

Swagger definitions Balloon, BalloonUpdate, BalloonStatsUpdate and BalloonStats
(Firecracker 1.7): PUT /balloon before the start (amount_mib, deflate_on_oom,
stats_polling_interval_s); GET /balloon in any state; PATCH /balloon (a new
amount_mib) and GET / PATCH /balloon/statistics after it. Statistics exist only
when an interval was set before the start, and cannot be switched on or off after
it. Fault messages are Firecracker's (``vmm_config/balloon.rs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...devices.virtio.balloon import MAX_STATS_INTERVAL_S, mib_to_pages, pages_to_mib
from .resources import ApiFault, Record, spec

NOT_FOUND = "No balloon device found."
TOO_LARGE = "Amount of pages requested is too large."
STATS_OFF = "Statistics for the balloon device are not enabled"
STATS_STATE = "Cannot enable/disable the statistics after boot."


@dataclass(frozen=True)
class Balloon(Record):
    amount_mib: int = spec(int)
    deflate_on_oom: bool = spec(bool)
    stats_polling_interval_s: int = spec(int, 0)

    def check(self) -> None:
        if self.stats_polling_interval_s > MAX_STATS_INTERVAL_S:
            raise ApiFault(f"stats_polling_interval_s: at most {MAX_STATS_INTERVAL_S}")


@dataclass(frozen=True)
class BalloonUpdate(Record):
    amount_mib: int = spec(int)


@dataclass(frozen=True)
class BalloonStatsUpdate(Record):
    stats_polling_interval_s: int = spec(int)

    def check(self) -> None:
        if self.stats_polling_interval_s > MAX_STATS_INTERVAL_S:
            raise ApiFault(f"stats_polling_interval_s: at most {MAX_STATS_INTERVAL_S}")


class BalloonApi:
    """The balloon resource of one :class:`~.vmm.Vmm`: its configuration before the
    start, the machine's device after it."""

    def __init__(self, vmm):
        self._vmm = vmm
        self.config: Balloon | None = None

    def _device(self):
        """The running machine's balloon device (ApiFault if none)."""
        machine = self._vmm._after_start()
        device = getattr(machine, "balloon", None)
        if device is None:
            raise ApiFault(NOT_FOUND)
        return device

    def _check_amount(self, amount_mib: int) -> None:
        if amount_mib > self._vmm.machine_config.mem_size_mib:
            raise ApiFault(TOO_LARGE)

    def put(self, body) -> None:
        record = Balloon.from_json(body)
        with self._vmm._lock:
            self._vmm._before_start()
            self._check_amount(record.amount_mib)
            self.config = record

    def get(self) -> dict:
        with self._vmm._lock:
            if self.config is None:
                raise ApiFault(NOT_FOUND)
            if self._vmm.machine is None:
                return self.config.to_json()
            device = self._device()
            return {"amount_mib": pages_to_mib(device.target_pages),
                    "deflate_on_oom": self.config.deflate_on_oom,
                    "stats_polling_interval_s": device.stats_interval_s}

    def patch(self, body) -> None:
        record = BalloonUpdate.from_json(body)
        with self._vmm._lock:
            device = self._device()
            self._check_amount(record.amount_mib)
            try:
                device.set_target(mib_to_pages(record.amount_mib))
            except ValueError:
                raise ApiFault(TOO_LARGE) from None
            self.config = Balloon(amount_mib=record.amount_mib,
                                  deflate_on_oom=self.config.deflate_on_oom,
                                  stats_polling_interval_s=device.stats_interval_s)
            self._vmm.log.info(f"The balloon target is now {record.amount_mib} MiB")

    def patch_stats(self, body) -> None:
        record = BalloonStatsUpdate.from_json(body)
        with self._vmm._lock:
            device = self._device()
            try:
                device.set_stats_interval(record.stats_polling_interval_s)
            except ValueError:
                raise ApiFault(STATS_STATE) from None
            self.config = Balloon(amount_mib=self.config.amount_mib,
                                  deflate_on_oom=self.config.deflate_on_oom,
                                  stats_polling_interval_s=record.stats_polling_interval_s)

    def stats(self) -> dict:
        with self._vmm._lock:
            device = self._device()
            if not device.stats_interval_s:
                raise ApiFault(STATS_OFF)
            target, actual = device.target_pages, device.actual_pages
            return {"target_pages": target, "actual_pages": actual,
                    "target_mib": pages_to_mib(target), "actual_mib": pages_to_mib(actual),
                    **device.stats.values}

    def machine_fields(self) -> dict:
        """What InstanceStart puts in the MachineConfig (its balloon* fields)."""
        if self.config is None:
            return {}
        return {"balloon": True, "balloon_mib": self.config.amount_mib,
                "balloon_deflate_on_oom": self.config.deflate_on_oom,
                "balloon_stats_s": self.config.stats_polling_interval_s}

    def describe_loaded(self, config) -> None:
        """After a snapshot load: the balloon the loaded machine has."""
        if config.balloon:
            self.config = Balloon(amount_mib=config.balloon_mib,
                                  deflate_on_oom=config.balloon_deflate_on_oom,
                                  stats_polling_interval_s=config.balloon_stats_s)

    def to_json(self) -> dict | None:
        """The "balloon" of GET /vm/config."""
        return self.config.to_json() if self.config is not None else None

    def routes(self) -> dict:
        return {("PUT", "/balloon"): self.put,
                ("GET", "/balloon"): lambda body: self.get(),
                ("PATCH", "/balloon"): self.patch,
                ("GET", "/balloon/statistics"): lambda body: self.stats(),
                ("PATCH", "/balloon/statistics"): self.patch_stats}
