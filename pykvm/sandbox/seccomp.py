"""Installing a seccomp filter on the calling thread, and reporting a forbidden call.

seccomp(2) with ``SECCOMP_SET_MODE_FILTER`` and no ``TSYNC`` flag confines only
the calling thread (and threads it starts later), so each pykvm thread installs
the filter of its own role. ``PR_SET_NO_NEW_PRIVS`` must be set first: it lets an
unprivileged process install a filter, and no later exec could gain privileges.

A filter answers a forbidden call with ``SECCOMP_RET_TRAP``: the kernel skips
the call and sends SIGSYS to the thread, with the call's number in
``siginfo.si_syscall`` (sigaction(2), "SIGSYS"). The handler installed here
(through ctypes, with ``SA_SIGINFO``, because Python's own handlers run later on
the main thread and would let the offending thread carry on) writes one line to
stderr naming the call and the thread, then ends the whole process with
:data:`KILL_STATUS`. It runs Python code in signal context; that is sound here
because every call the allocator and the GIL make is allowed, so the trap never
interrupts them, and because it never lets go of the GIL: it writes and exits through
libc called with the GIL held (``ctypes.PyDLL``). ``os.write`` would release the GIL,
and a trapped ``fork()`` holds glibc's malloc locks: another thread taking the GIL
then blocks in malloc and the handler never gets the GIL back (seen as a hang after
the line was written).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

from ..errors import PykvmError
from .syscalls import X32_SYSCALL_BIT, name as syscall_name

KILL_STATUS = 159           # 128 + SIGSYS: what a shell shows for a process killed by SIGSYS
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SA_SIGINFO = 4
SA_NODEFER = 0x40000000
_NR_SECCOMP = 317
_SI_SYSCALL_OFFSET = 24     # siginfo_t: signo, errno, code, pad, then _sigsys {call_addr, syscall, arch}
# ucontext_t: uc_flags, uc_link, uc_stack (24 bytes), then mcontext_t's gregs, where the
# system call's first three arguments are RDI, RSI, RDX (gregs 8, 9, 12; <sys/ucontext.h>).
_ARG_OFFSETS = tuple(40 + 8 * reg for reg in (8, 9, 12))

_libc = ctypes.CDLL(None, use_errno=True)
_libc_holding_gil = ctypes.PyDLL(None)     # for the SIGSYS handler: see the module docstring
_libc_holding_gil.write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_libc_holding_gil._exit.argtypes = (ctypes.c_int,)


class SandboxError(PykvmError):
    """The kernel refused to install a seccomp filter (no CONFIG_SECCOMP_FILTER?)."""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86-64."""
    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_thread_role = threading.local()    # .name: the role this thread took, for the report
_handler_lock = threading.Lock()
_handler = None                     # the ctypes callback, kept alive for the process's lifetime


def _report(signo: int, info: int, context: int) -> None:
    number = ctypes.c_int.from_address(info + _SI_SYSCALL_OFFSET).value & 0xFFFFFFFF
    thread = threading.current_thread()
    role = getattr(_thread_role, "name", "inherited from the thread that started it")
    label = syscall_name(number) if number & X32_SYSCALL_BIT else \
        f"{syscall_name(number)} ({number})"
    args = ", ".join(f"{ctypes.c_uint64.from_address(context + offset).value:#x}"
                     for offset in _ARG_OFFSETS)
    line = (f"pykvm: seccomp: thread {thread.name} (role {role}) made the forbidden system "
            f"call {label} with arguments {args}, ...; the VMM exits with status "
            f"{KILL_STATUS}\n")
    try:
        data = line.encode()
        _libc_holding_gil.write(2, data, len(data))
    finally:
        _libc_holding_gil._exit(KILL_STATUS)


def install_reporter() -> None:
    """Install the SIGSYS handler (once per process; later calls do nothing)."""
    global _handler
    with _handler_lock:
        if _handler is not None:
            return
        handler = _HANDLER_TYPE(_report)
        action = _Sigaction()
        action.sa_sigaction = ctypes.cast(handler, ctypes.c_void_p).value
        action.sa_flags = SA_SIGINFO | SA_NODEFER
        if _libc.sigaction(signal.SIGSYS, ctypes.byref(action), None) != 0:
            raise SandboxError(f"sigaction(SIGSYS) failed: {os.strerror(ctypes.get_errno())}")
        _handler = handler


def install_filter(program: bytes, role: str) -> None:
    """Confine the calling thread to ``program`` (an assembled seccomp BPF program)."""
    install_reporter()
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: "
                           f"{os.strerror(ctypes.get_errno())}")
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(code))
    if _libc.syscall(_NR_SECCOMP, SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog)) != 0:
        raise SandboxError(f"seccomp(SECCOMP_SET_MODE_FILTER) failed: "
                           f"{os.strerror(ctypes.get_errno())}")
    _thread_role.name = role


def thread_filters(native_id: int) -> int:
    """How many seccomp filters thread ``native_id`` of this process runs under (read
    from /proc by another thread: a confined thread may not ask)."""
    with open(f"/proc/self/task/{native_id}/status") as status:
        for line in status:
            if line.startswith("Seccomp_filters:"):
                return int(line.split()[1])
    return 0
