"""A TAP device: the host end of a virtual NIC, opened through /dev/net/tun.

The fd speaks whole Ethernet frames, each preceded by a virtio_net_hdr
(IFF_VNET_HDR): with TUNSETVNETHDRSZ 12 that header is exactly virtio 1.x's
virtio_net_hdr_v1 (flags, gso_type, hdr_len, gso_size, csum_start,
csum_offset, num_buffers), so virtio-net frames pass between guest buffers and
the TAP with no translation and no copy in Python. IFF_NO_PI: no extra
protocol-information prefix. The fd is non-blocking; the device thread polls
it. TUNSETOFFLOAD says what the reader (the guest) can take: partial checksums
(TUN_F_CSUM), TSO frames (TUN_F_TSO4/6, TUN_F_TSO_ECN).

No fcntl module: the requests go through libc's ioctl (pykvm.ioctl.raw_ioctl)
with a ctypes struct ifreq, and errors become typed exceptions here.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..errors import ConfigError, PykvmError
from ..ioctl.call import raw_ioctl

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16

# --- <linux/if_tun.h> -------------------------------------------------------------------
TUNSETIFF = 0x400454CA          # _IOW('T', 202, int)
TUNSETPERSIST = 0x400454CB      # _IOW('T', 203, int)
TUNGETFEATURES = 0x800454CF     # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0      # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2          # _IOR('T', 210, unsigned int)
TUNGETVNETHDRSZ = 0x800454D7    # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8    # _IOW('T', 216, int)

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

VNET_HDR_SIZE = 12              # virtio_net_hdr_v1 (virtio 1.x): 10 bytes + num_buffers
DEFAULT_NAME_TEMPLATE = "pykvm%d"   # the kernel replaces %d with the first free number


class TapError(ConfigError):
    """A TAP could not be opened or configured (one line, for the CLI)."""


class ifreq(ctypes.Structure):
    """struct ifreq as TUNSETIFF uses it: the name, then the flags (a 24-byte union)."""

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ),
                ("ifr_flags", ctypes.c_short),
                ("_pad", ctypes.c_ubyte * 22)]


class ifreq_int(ctypes.Structure):
    """struct ifreq with an int in the union (SIOCGIFMTU's ifr_mtu)."""

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ),
                ("ifr_value", ctypes.c_int),
                ("_pad", ctypes.c_ubyte * 20)]


# Interface ioctls on any socket (linux/sockios.h); netdevice(7).
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
IFF_UP = 0x1


def _call(fd: int, request: int, arg) -> int:
    """ioctl through libc; returns errno (0 on success)."""
    result = raw_ioctl(fd, request, arg if isinstance(arg, int) else ctypes.byref(arg))
    return 0 if result >= 0 else ctypes.get_errno()


def valid_ifname(name: str) -> bool:
    """What the kernel accepts as an interface name (dev_valid_name)."""
    return (0 < len(name.encode()) < IFNAMSIZ and name not in (".", "..")
            and not any(c in name for c in "/:") and not any(c.isspace() for c in name))


class Tap:
    """An open TAP: ``fd`` (non-blocking), ``name``, ``ifindex``. ``created`` says
    whether this open created the interface (then it disappears when the fd
    closes, unless made persistent) or attached to one that already existed.

    Opened in the calling thread's network namespace."""

    def __init__(self, name: str | None = None, *, vnet_hdr_size: int = VNET_HDR_SIZE,
                 device: str = TUN_DEVICE):
        wanted = name or DEFAULT_NAME_TEMPLATE
        if not valid_ifname(wanted):
            raise TapError(f"TAP name {wanted!r} is not a valid interface name "
                           f"(1 to {IFNAMSIZ - 1} characters, no '/', ':' or spaces)")
        existed = _link_exists(wanted) if "%" not in wanted else False
        self.fd = -1
        self.offload = 0
        # A persistent TAP keeps the flags of its last attach and its header size:
        # whoever attached it (plumbing.py reads them over netlink) sets these to
        # have Tap.close put them back.
        self.restore_flags: int | None = None
        self.restore_hdr_size: int | None = None
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(f"{device} does not exist (load the tun module: modprobe tun)") from None
        except PermissionError:
            raise TapError(f"no permission to open {device} (TAP devices need root or "
                           f"CAP_NET_ADMIN)") from None
        except OSError as error:
            raise TapError(f"cannot open {device}: {error.strerror}") from None
        try:
            request = ifreq(ifr_name=wanted.encode(), ifr_flags=IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            err = _call(self.fd, TUNSETIFF, request)
            if err:
                raise TapError(_setiff_message(wanted, err, existed))
            self.name = request.ifr_name.decode()
            self.created = not existed
            previous = ctypes.c_int(0)
            _call(self.fd, TUNGETVNETHDRSZ, previous)
            size = ctypes.c_int(vnet_hdr_size)
            err = _call(self.fd, TUNSETVNETHDRSZ, size)
            if err:
                raise TapError(f"TAP {self.name}: cannot set the vnet header size to "
                               f"{vnet_hdr_size}: {os.strerror(err)}")
            self.vnet_hdr_size = vnet_hdr_size
            self.restore_hdr_size = previous.value if existed else None
            self.set_offload(0)
            self.ifindex = _ifindex(self.name)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def set_offload(self, flags: int) -> None:
        """What the reader accepts (TUN_F_*): the kernel then hands it partial
        checksums and TSO frames instead of finishing them itself."""
        err = _call(self.fd, TUNSETOFFLOAD, flags)
        if err:
            raise PykvmError(f"TAP {getattr(self, 'name', '?')}: TUNSETOFFLOAD {flags:#x} "
                             f"failed: {os.strerror(err)}")
        self.offload = flags

    def features(self) -> int:
        value = ctypes.c_uint(0)
        return value.value if not _call(self.fd, TUNGETFEATURES, value) else 0

    def bring_up(self) -> int:
        """Set the interface up (netdevice(7) SIOCSIFFLAGS, in the calling thread's network
        namespace) and return its MTU. Two ioctls on a socket: `--net tap` with nothing
        else to plumb needs no netlink library (pyroute2 stays resident, ~19 MiB;
        bench/memory.py)."""
        import socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = ifreq(ifr_name=self.name.encode())
            err = _call(sock.fileno(), SIOCGIFFLAGS, request)
            if not err and not request.ifr_flags & IFF_UP:
                request.ifr_flags |= IFF_UP
                err = _call(sock.fileno(), SIOCSIFFLAGS, request)
            if err:
                raise TapError(f"TAP {self.name}: cannot set it up: {os.strerror(err)}")
            mtu = ifreq_int(ifr_name=self.name.encode())
            return mtu.ifr_value if not _call(sock.fileno(), SIOCGIFMTU, mtu) else 0

    def close(self) -> None:
        if self.fd < 0:
            return
        if not self.created:
            # A TAP that outlives us keeps what we set on it: put it back.
            if self.offload:
                try:
                    self.set_offload(0)
                except PykvmError:
                    pass
            if self.restore_hdr_size not in (None, self.vnet_hdr_size):
                _call(self.fd, TUNSETVNETHDRSZ, ctypes.c_int(self.restore_hdr_size))
        os.close(self.fd)
        self.fd = -1
        ours = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        if not self.created and self.restore_flags not in (None, ours):
            # The flags are the last attacher's: attach once more with the old ones.
            try:
                fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return
            try:
                _call(fd, TUNSETIFF, ifreq(ifr_name=self.name.encode(),
                                           ifr_flags=self.restore_flags))
            finally:
                os.close(fd)

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap({getattr(self, 'name', '?')!r}, fd={self.fd})"


def _link_exists(name: str) -> bool:
    try:
        _ifindex(name)
    except OSError:
        return False
    return True


def _ifindex(name: str) -> int:
    import socket
    return socket.if_nametoindex(name)


def _setiff_message(name: str, err: int, existed: bool) -> str:
    if err == errno.EPERM:
        return (f"TAP {name}: permission denied (creating or attaching a TAP needs "
                f"CAP_NET_ADMIN, or a persistent TAP owned by this user)")
    if err == errno.EINVAL and existed:
        return (f"{name} exists and is not a single-queue TAP device (another kind of link, "
                f"a TUN or a multi-queue TAP): choose another name")
    if err == errno.EBUSY:
        return f"TAP {name} is in use by another process"
    if err == errno.ENOTTY:
        return "the kernel's tun driver does not understand TUNSETIFF"
    return f"TAP {name}: TUNSETIFF failed: {os.strerror(err)}"
