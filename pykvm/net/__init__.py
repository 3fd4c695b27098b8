"""The host side of virtual NICs: TAP devices (tap.py) and their plumbing into
bridges, addresses and network namespaces with pyroute2 (plumbing.py)."""

from ..lazy import lazy_exports

_EXPORTS = {name: ".plumbing" for name in ("NET_USAGE", "NetSpec", "NicBackend", "default_mac",
                                           "format_mac", "machine_key", "open_nic", "parse_mac")}
_EXPORTS.update(Tap=".tap", TapError=".tap")
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
