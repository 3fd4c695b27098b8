"""A NIC's MAC address: parsed from ``mac=``, printed, or derived.

:func:`default_mac` is locally administered and unicast (IEEE 802: bit 1 of the first
byte set, bit 0 clear), derived by hashing the machine's identity (:func:`machine_key`)
and the NIC's index, so the same configuration gets the same MAC on every run. Nothing
here opens a device: the --net parser (pykvm/machine/config.py), the TAP's plumbing
and passt all use it, and it imports none of them.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

# SHA-256 without OpenSSL: hashlib loads libcrypto, 3.7 MiB resident in every run with a
# NIC (bench/memory.py), for these few bytes; CPython's own implementation is the same
# function (FIPS 180-4)
try:
    from _sha2 import sha256            # CPython >= 3.12
except ImportError:
    try:
        from _sha256 import sha256      # CPython 3.11
    except ImportError:
        from hashlib import sha256

_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' (or with '-') -> 6 bytes; a unicast, non-zero address."""
    if not _MAC.match(text):
        raise ConfigError(f"MAC address {text!r} is malformed (use six hex bytes, "
                          f"e.g. 52:54:00:12:34:56)")
    mac = bytes(int(part, 16) for part in re.split("[:-]", text))
    if mac[0] & 1:
        raise ConfigError(f"MAC address {text} is a multicast address (the first byte must "
                          f"be even)")
    if mac == bytes(6):
        raise ConfigError("MAC address 00:00:00:00:00:00 is not a valid station address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(machine_key: str, index: int) -> bytes:
    """A locally administered unicast MAC derived from the machine and the NIC index:
    the same for the same configuration on every run, different per NIC."""
    digest = sha256(f"pykvm-net\0{machine_key}\0{index}".encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


def machine_key(config) -> str:
    """What identifies a machine for its default MACs: the guest it boots, its disks
    and its NICs' host ends (not memory or vCPUs, which may change freely)."""
    parts = [str(getattr(config, "kernel", None) or getattr(config, "flat", None) or "")]
    parts += [str(getattr(disk, "path", disk)) for disk in getattr(config, "disks", [])]
    parts += [f"{n.tap or ''}/{n.bridge or ''}/{n.netns or ''}"
              + ("" if getattr(n, "mode", "tap") == "tap" else f"/{n.mode}")
              for n in getattr(config, "nets", [])]
    return "\n".join(parts)
