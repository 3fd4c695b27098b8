"""`--trace-filter TERMS`: which exits the tracer writes a line for.

Parsing is kept apart from the tracer so the CLI can check a filter before it
builds a machine (a bad term is a one-line error, exit status 2) and so other
callers (the pytest plugin, the control socket) can hand the tracer the same
typed :class:`TraceFilter`. Exit reason names are KVM's (KVM_EXIT_* in
<linux/kvm.h>, lower case, as pykvm.ioctl.requests.EXIT_NAMES spells them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..ioctl.requests import EXIT_NAMES

FILTER_HELP = (
    "TERMS are space-separated KEY=VALUES, all of which must hold; VALUES is a comma-separated "
    "list, any of which may match; LOW-HIGH ranges include both ends; numbers are decimal or "
    "0x-hex. Keys: reason=io,mmio,hlt,internal_error,... (exit reasons, KVM_EXIT_* in lower "
    "case); port=0x3f8-0x3ff (port-I/O exits at these ports); addr=0xd0000000-0xd0000fff "
    "(MMIO exits at these guest-physical addresses); device=serial,none (the device that "
    "handled it; none: no device); dir=in,out,read,write; vcpu=0,1. port= limits port-I/O "
    "exits and addr= MMIO exits; without reason=, they also select only the kinds they name. "
    "Repeatable. Example: --trace-filter 'reason=io,mmio port=0x3f8-0x3ff "
    "addr=0xd0000000-0xd0000fff'")

_REASON_ALIASES = {"pio": "io", "port": "io"}
_DIRECTIONS = {"in": "in", "read": "in", "out": "out", "write": "out"}


def _number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"--trace-filter {what}: {text!r} is not a number") from None


def _ranges(values: list[str], what: str) -> list[tuple[int, int]]:
    ranges = []
    for value in values:
        low, _, high = value.partition("-")
        lo = _number(low, what)
        hi = _number(high, what) if high else lo
        if hi < lo:
            raise ConfigError(f"--trace-filter {what}={value}: the range ends before it starts")
        ranges.append((lo, hi))
    return ranges


@dataclass
class TraceFilter:
    reasons: set[str] | None = None
    ports: list[tuple[int, int]] | None = None
    addrs: list[tuple[int, int]] | None = None
    devices: set[str] | None = None
    directions: set[str] | None = None
    vcpus: set[int] | None = None

    @classmethod
    def parse(cls, specs: list[str] | str | None) -> "TraceFilter":
        if isinstance(specs, str):
            specs = [specs]
        terms: dict[str, list[str]] = {}
        for spec in specs or []:
            for term in spec.split():
                key, sep, values = term.partition("=")
                if not sep or not values:
                    raise ConfigError(f"--trace-filter {term!r}: want KEY=VALUES, "
                                      f"e.g. port=0x3f8-0x3ff")
                terms.setdefault(key.lower(), []).extend(v for v in values.split(",") if v)
        known = set(EXIT_NAMES.values())
        result = cls()
        for key, values in terms.items():
            if key == "reason":
                reasons = {_REASON_ALIASES.get(v.lower(), v.lower()) for v in values}
                unknown = reasons - known
                if unknown:
                    raise ConfigError(f"--trace-filter reason={','.join(sorted(unknown))}: unknown "
                                      f"exit reason (known: {', '.join(sorted(known))})")
                result.reasons = reasons
            elif key == "port":
                result.ports = _ranges(values, key)
            elif key in ("addr", "address"):
                result.addrs = _ranges(values, key)
            elif key in ("device", "dev"):
                result.devices = set(values)
            elif key in ("dir", "direction"):
                bad = [v for v in values if v.lower() not in _DIRECTIONS]
                if bad:
                    raise ConfigError(f"--trace-filter dir={bad[0]}: use in, out, read or write")
                result.directions = {_DIRECTIONS[v.lower()] for v in values}
            elif key in ("vcpu", "cpu"):
                result.vcpus = {_number(v, key) for v in values}
            else:
                raise ConfigError(f"--trace-filter: unknown key {key!r} "
                                  f"(use reason, port, addr, device, dir, vcpu)")
        if result.reasons is None and (result.ports is not None or result.addrs is not None):
            result.reasons = ({"io"} if result.ports is not None else set()) \
                | ({"mmio"} if result.addrs is not None else set())
        return result

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.reasons, self.ports, self.addrs, self.devices,
                                        self.directions, self.vcpus))

    def _common(self, vcpu_id: int, reason: str, device: str | None, direction: str | None) -> bool:
        if self.vcpus is not None and vcpu_id not in self.vcpus:
            return False
        if self.reasons is not None and reason not in self.reasons:
            return False
        if self.devices is not None and (device or "none") not in self.devices:
            return False
        if self.directions is not None and direction not in self.directions:
            return False
        return True

    def pio(self, vcpu_id: int, port: int, direction: int, device: str | None) -> bool:
        if not self._common(vcpu_id, "io", device, "out" if direction else "in"):
            return False
        return self.ports is None or any(lo <= port <= hi for lo, hi in self.ports)

    def mmio(self, vcpu_id: int, addr: int, is_write: bool, device: str | None) -> bool:
        if not self._common(vcpu_id, "mmio", device, "out" if is_write else "in"):
            return False
        return self.addrs is None or any(lo <= addr <= hi for lo, hi in self.addrs)

    def other(self, vcpu_id: int, reason: str) -> bool:
        return self.devices is None and self.directions is None \
            and self._common(vcpu_id, reason, None, None)
