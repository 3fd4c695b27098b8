"""What a machine's vsock device is: the guest's CID and the host's Unix socket.

``pykvm run --vsock CID[,uds=PATH]`` and Firecracker's ``PUT /vsock`` (``guest_cid``,
``uds_path``) both become a :class:`VsockSpec`. Without ``uds=`` the socket goes in a
new private directory (0700) that pykvm removes with the machine; the CLI says where.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .packet import MAX_GUEST_CID, MIN_GUEST_CID

USAGE = "CID[,uds=PATH]"
MAX_PATH = 107 - len("_4294967295")   # sun_path holds 108 bytes with the NUL


@dataclass(frozen=True)
class VsockSpec:
    guest_cid: int
    uds_path: str = ""           # "" until the machine makes its private one

    def __post_init__(self):
        check_cid(self.guest_cid)
        if len(self.uds_path.encode()) > MAX_PATH or "\0" in self.uds_path:
            raise ConfigError(f"vsock uds_path: at most {MAX_PATH} bytes (a Unix socket's "
                              f"path, with room for _PORT) and no NUL")

    @classmethod
    def parse(cls, text: str) -> "VsockSpec":
        cid, *options = text.split(",")
        if not cid.isdigit() or len(cid) > 10:
            raise ConfigError(f"--vsock {text!r}: the guest CID must be a number "
                              f"(use {USAGE})")
        path = ""
        for option in options:
            if option.startswith("uds=") and len(option) > 4:
                path = option[4:]
            else:
                raise ConfigError(f"--vsock {text!r}: unknown option {option!r} (use {USAGE})")
        return cls(int(cid), path)


def check_cid(cid: int) -> None:
    if isinstance(cid, bool) or not isinstance(cid, int) or \
            not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
        raise ConfigError(f"vsock guest CID {cid}: must be {MIN_GUEST_CID} to {MAX_GUEST_CID} "
                          f"(0-2 are reserved, 0xffffffff means any)")
