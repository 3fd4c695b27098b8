"""The host side of virtual NICs: TAP devices (tap.py) and their plumbing into
bridges, addresses and network namespaces with pyroute2 (plumbing.py)."""

from .plumbing import (NET_USAGE, NetSpec, NicBackend, default_mac, format_mac, machine_key,
                       open_nic, parse_mac)
from .tap import Tap, TapError

__all__ = ["NET_USAGE", "NetSpec", "NicBackend", "Tap", "TapError", "default_mac", "format_mac",
           "machine_key", "open_nic", "parse_mac"]
