"""Per-vCPU exit statistics: what exited to pykvm, how often, and where time went.

The run loop only increments integers here; observe/report.py formats them at the end.
Time inside KVM_RUN is "guest" time, which includes whatever KVM handled in the
kernel without exiting to pykvm (in-kernel LAPIC/PIT/IOAPIC, ioeventfd, page
faults): user space cannot separate those two.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..errors import StatsDecodeError
from ..ioctl.requests import EXIT_NAMES


@dataclass
class VcpuStats:
    vcpu_id: int
    exits: list[int] = field(default_factory=lambda: [0] * 64)
    # Port-I/O exits per port and direction: index port << 1 | (1 for out), a list
    # because incrementing it is the cheapest count the run loop can make.
    port_counts: list[int] = field(default_factory=lambda: [0] * (1 << 17))
    mmio: defaultdict = field(default_factory=lambda: defaultdict(int))   # (addr, "read"/"write") -> n
    devices: defaultdict = field(default_factory=lambda: defaultdict(int))  # device name -> n
    quirks: Counter = field(default_factory=Counter)   # completion kind -> n
    unhandled_pio: int = 0
    unhandled_mmio: int = 0
    guest_ns: int = 0       # inside KVM_RUN
    handler_ns: int = 0     # in pykvm's exit handlers
    started_ns: int = 0
    stopped_ns: int = 0

    @property
    def pio(self) -> defaultdict:
        """(port, "in"/"out") -> exits, for the ports that had any."""
        return defaultdict(int, {(index >> 1, "out" if index & 1 else "in"): n
                                 for index, n in enumerate(self.port_counts) if n})

    @property
    def total_exits(self) -> int:
        return sum(self.exits)

    def exits_by_name(self) -> dict[str, int]:
        return {EXIT_NAMES.get(reason, str(reason)): n
                for reason, n in enumerate(self.exits) if n}

    @property
    def wall_ns(self) -> int:
        """Since the vCPU thread started; up to now while it still runs (live --stats)."""
        if not self.started_ns:
            return 0
        return max((self.stopped_ns or time.perf_counter_ns()) - self.started_ns, 0)

    @property
    def other_ns(self) -> int:
        """Wall time neither in the guest nor in a handler: paused, waiting, loop overhead."""
        return max(self.wall_ns - self.guest_ns - self.handler_ns, 0)

    def as_dict(self) -> dict:
        return {
            "vcpu": self.vcpu_id,
            "exits": self.exits_by_name(),
            "pio": {f"{port:#x}/{direction}": n for (port, direction), n in sorted(self.pio.items())},
            "mmio": {f"{addr:#x}/{kind}": n for (addr, kind), n in sorted(self.mmio.items())},
            "devices": dict(self.devices),
            "quirks": dict(self.quirks),
            "unhandled": {"pio": self.unhandled_pio, "mmio": self.unhandled_mmio},
            "time_ns": {"wall": self.wall_ns, "guest": self.guest_ns,
                        "handlers": self.handler_ns, "other": self.other_ns},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "VcpuStats":
        """The inverse of :meth:`as_dict` (what the control socket's "stats" sends).
        The answer comes from another process: every table, key and count is checked,
        and a malformed one is a StatsDecodeError naming it. Exit reasons this pykvm
        does not know are skipped (a newer pykvm may count more kinds)."""
        if not isinstance(data, dict):
            raise StatsDecodeError(f"a vCPU's statistics: want an object, got {type(data).__name__}")
        stats = cls(_count(data.get("vcpu"), "vcpu"))
        numbers = {name: number for number, name in EXIT_NAMES.items()}
        for name, n in _table(data, "exits").items():
            reason = numbers.get(name, int(name) if name.isdigit() else None)
            if reason is not None and reason < len(stats.exits):
                stats.exits[reason] = n
        for key, n in _table(data, "pio").items():
            port, direction = _keyed(key, "pio", ("in", "out"), 0xFFFF)
            stats.port_counts[port << 1 | (direction == "out")] = n
        for key, n in _table(data, "mmio").items():
            stats.mmio[_keyed(key, "mmio", ("read", "write"), (1 << 64) - 1)] = n
        stats.devices.update(_table(data, "devices"))
        stats.quirks.update(_table(data, "quirks"))
        unhandled, times = _table(data, "unhandled"), _table(data, "time_ns")
        stats.unhandled_pio, stats.unhandled_mmio = unhandled.get("pio", 0), unhandled.get("mmio", 0)
        stats.guest_ns, stats.handler_ns = times.get("guest", 0), times.get("handlers", 0)
        stats.started_ns, stats.stopped_ns = 1, 1 + times.get("wall", 0)
        return stats


MAX_VCPUS_IN_ANSWER = 1024   # KVM's own KVM_MAX_VCPUS on x86 is 1024 (4096 with MAXSMP)


def from_answer(vcpus) -> list[VcpuStats]:
    """The "vcpus" list of a control socket's "stats" answer, checked like from_dict."""
    if not isinstance(vcpus, list) or len(vcpus) > MAX_VCPUS_IN_ANSWER:
        raise StatsDecodeError(f"vcpus: want a list of at most {MAX_VCPUS_IN_ANSWER} vCPUs")
    return [VcpuStats.from_dict(vcpu) for vcpu in vcpus]


def _count(value, where: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise StatsDecodeError(f"{where}: want a count, got {str(value)[:40]!r}")
    return value


def _table(data: dict, name: str) -> dict[str, int]:
    """``data[name]``: names to counts ({} when absent)."""
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise StatsDecodeError(f"{name}: want an object, got {type(table).__name__}")
    for key, value in table.items():
        _count(value, f"{name}.{str(key)[:40]}")
    return table


def _keyed(key: str, table: str, kinds: tuple[str, ...], limit: int) -> tuple[int, str]:
    """``0x3f8/out`` -> (0x3f8, "out"): a hex address up to ``limit`` and one of ``kinds``."""
    number, _, kind = key.partition("/")
    try:
        value = int(number, 16)
    except ValueError:
        value = -1
    if not 0 <= value <= limit or kind not in kinds:
        raise StatsDecodeError(f"{table}: {key[:40]!r} is not ADDRESS/{'|'.join(kinds)}")
    return value, kind
