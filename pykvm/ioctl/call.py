"""The one ioctl() pykvm makes: libc's, through ctypes, with errno kept.

No ``fcntl`` module: ctypes lets the argument be an int, a pointer to a
Structure, or nothing, and lets KVM_RUN release the GIL while the guest runs.
"""

import ctypes
import errno as errno_codes

from ..errors import KvmError
from .requests import REQUEST_NAMES

# The process's own symbols, libc's among them: ctypes.util.find_library("c") would cost
# every start ~10-40 ms (it imports subprocess and tempfile and runs ldconfig).
libc = ctypes.CDLL(None, use_errno=True)
raw_ioctl = libc.ioctl
raw_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
raw_ioctl.restype = ctypes.c_int


def request_name(request: int) -> str:
    return REQUEST_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg=None) -> int:
    """ioctl(fd, request, arg) -> non-negative result, or KvmError(request name, errno).

    ``arg`` is an int (passed by value), a ctypes object (passed by reference),
    or None.
    """
    if arg is None or isinstance(arg, int):
        result = raw_ioctl(fd, request, arg)
    else:
        result = raw_ioctl(fd, request, ctypes.byref(arg))
    if result < 0:
        err = ctypes.get_errno()
        raise KvmError(request_name(request), err)
    return result


def is_interrupted(error: KvmError) -> bool:
    return error.errno == errno_codes.EINTR
