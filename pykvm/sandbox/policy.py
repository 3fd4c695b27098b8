"""What each pykvm thread may ask of the kernel once it is set up: one allow-list
per thread role, and the BPF program that enforces it.

Roles (see the README's "Threat model and sandbox"):

- ``vcpu``: the KVM_RUN loop. It also emulates every port-I/O and MMIO access in
  Python (legacy devices, virtio configuration, MSI-X), serves the requests other
  threads queue with ``Vcpu.call`` (registers for gdb, snapshots, quirks), writes
  the console and the trace, and may start the serial flusher thread. So: the
  vCPU and VM ioctls of a running machine (never the ones that create a VM or
  vCPU, or map memory), reads and writes on fds it already holds, and the CPython
  runtime.
- ``device``: a virtio device's I/O thread (and the TAP watcher): poll, read and
  write, vectored and positioned I/O on the image or TAP, fsync, and the interrupt
  ioctls a device raises (INTx line, MSI).
- ``control``: the control socket's and the gdb stub's threads (and the connection
  threads they start). They create snapshot files, read and write guest memory and
  talk to clients, so they get a deny-list instead: no new programs or processes, no
  ptrace or cross-process memory access, no privilege, namespace, mount, module, BPF
  or io_uring calls (io_uring would run I/O that no filter sees).

``vcpu`` and ``device`` refuse: opening a file for writing, creating processes (clone without
CLONE_THREAD, fork, vfork, execve), ptrace, sockets, mounts, executable memory (mmap or
mprotect with PROT_EXEC: code a compromised thread writes cannot be run), anything
not listed.
Opening a file read-only fails with EACCES instead of killing: Python's own lazy
machinery (a traceback's source lines, an import) tries it on error paths, and
refusing is as safe as killing for a call that never runs.

The program checks the architecture first (anything but x86-64 is killed
outright: the numbers would mean other calls), then ``ioctl`` with ``KVM_RUN``
(the one call per guest exit: three comparisons and it is allowed), then the x32
bit, then the rest.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

from ..ioctl import requests as k
from ..net.tap import TUNSETOFFLOAD
from . import bpf
from .syscalls import AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, number

# --- filter return values (include/uapi/linux/seccomp.h) --------------------------------
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

CLONE_THREAD = 0x00010000
OPEN_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# What any CPython thread needs to keep running: the allocator, the GIL and locks,
# signals (the vCPU kick, SIGSYS's own return), clocks and sleeps, threads (with
# CLONE_THREAD only: checked below), and its own end.
RUNTIME = (
    "futex", "mmap", "munmap", "mremap", "mprotect", "madvise", "brk",
    "rt_sigreturn", "rt_sigprocmask", "sigaltstack", "restart_syscall",
    "clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep", "nanosleep",
    "sched_yield", "sched_getaffinity", "getcpu", "getpid", "gettid", "tgkill", "getrandom",
    "set_robust_list", "rseq", "exit", "exit_group",
    "close", "fcntl", "fstat", "newfstatat", "lseek", "read", "write",
    "getcwd",                   # the import system asks before it finds it cannot open

    "poll", "ppoll", "select", "pselect6",
)
DEVICE_IO = (
    "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "fsync", "fdatasync", "fallocate",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl",
    "recvfrom", "sendto", "recvmsg", "sendmsg",      # a channel's socket pair (agent)
)

# KVM ioctls raising an interrupt: any thread that completes a request may need them.
INTERRUPT_IOCTLS = (k.KVM_IRQ_LINE, k.KVM_IRQ_LINE_STATUS, k.KVM_SIGNAL_MSI)
# A running vCPU's and VM's ioctls, KVM_RUN first (the hot path is the first compare).
VCPU_IOCTLS = (
    k.KVM_RUN,
    k.KVM_GET_REGS, k.KVM_SET_REGS, k.KVM_GET_SREGS, k.KVM_SET_SREGS, k.KVM_TRANSLATE,
    k.KVM_GET_MSRS, k.KVM_SET_MSRS, k.KVM_GET_FPU, k.KVM_SET_FPU, k.KVM_GET_LAPIC,
    k.KVM_SET_LAPIC, k.KVM_GET_CPUID2, k.KVM_GET_MP_STATE, k.KVM_SET_MP_STATE, k.KVM_NMI,
    k.KVM_SET_GUEST_DEBUG, k.KVM_GET_VCPU_EVENTS, k.KVM_SET_VCPU_EVENTS,
    k.KVM_GET_DEBUGREGS, k.KVM_SET_DEBUGREGS, k.KVM_GET_XSAVE, k.KVM_SET_XSAVE,
    k.KVM_GET_XCRS, k.KVM_SET_XCRS, k.KVM_GET_TSC_KHZ, k.KVM_KVMCLOCK_CTRL,
    # the VM's, for what a guest configures at run time (virtio queues, MSI-X routes)
    k.KVM_IOEVENTFD, k.KVM_IRQFD, k.KVM_SET_GSI_ROUTING,
    k.KVM_GET_IRQCHIP, k.KVM_SET_IRQCHIP, k.KVM_GET_PIT2, k.KVM_SET_PIT2,
    k.KVM_GET_CLOCK, k.KVM_SET_CLOCK,
    # read-only queries of /dev/kvm (the tracer asks for KVM_CAP_SYNC_REGS, a snapshot
    # for the MSR list); never KVM_CREATE_VM
    k.KVM_CHECK_EXTENSION, k.KVM_GET_MSR_INDEX_LIST, k.KVM_GET_MSR_FEATURE_INDEX_LIST,
    k.KVM_GET_SUPPORTED_CPUID, k.KVM_GET_VCPU_MMAP_SIZE, k.KVM_GET_API_VERSION,
    # virtio-net sets the TAP's offloads to what the driver negotiated (DRIVER_OK, reset)
    TUNSETOFFLOAD,
) + INTERRUPT_IOCTLS


# What the control role may never do (it may do anything else).
DENIED_TO_CONTROL = (
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsmount", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid", "capset", "personality", "keyctl", "add_key",
    "request_key", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff",
    "reboot", "syslog", "acct", "iopl", "ioperm", "seccomp",
)


@dataclass(frozen=True)
class Role:
    """A thread role. An allow-list role (``otherwise`` = trap) names the system calls it
    may make and, for ``ioctl``, the requests; a deny-list role (``otherwise`` = allow)
    names what it may not, and leaves ioctl unchecked (``ioctls`` None)."""
    name: str
    syscalls: tuple[str, ...] = ()
    ioctls: tuple[int, ...] | None = None
    denied: tuple[str, ...] = ()
    otherwise: int = SECCOMP_RET_TRAP

    def program(self) -> bytes:
        return build_filter(self)


ROLES: dict[str, Role] = {
    "vcpu": Role("vcpu", RUNTIME + DEVICE_IO, VCPU_IOCTLS),
    "device": Role("device", RUNTIME + DEVICE_IO, INTERRUPT_IOCTLS),
    "control": Role("control", denied=DENIED_TO_CONTROL, otherwise=SECCOMP_RET_ALLOW),
}


def build_filter(role: Role) -> bytes:
    """The seccomp BPF program for ``role`` (see the module docstring for its order)."""
    allow_list = role.otherwise != SECCOMP_RET_ALLOW
    p = bpf.Program()
    p.load(bpf.DATA_ARCH)
    p.jeq(AUDIT_ARCH_X86_64, false="kill")
    p.load(bpf.DATA_NR)
    if role.ioctls is not None:
        p.jeq(number("ioctl"), true="ioctl")
    p.jge(X32_SYSCALL_BIT, true="trap")
    if allow_list:
        p.jeq(number("openat"), true="openat")
        p.jeq(number("open"), true="open")
        p.jeq(number("mmap"), true="prot")
        p.jeq(number("mprotect"), true="prot")
    p.jeq(number("clone"), true="clone")
    p.jeq(number("clone3"), true="enosys")   # its flags are behind a pointer: glibc falls back
    for name in dict.fromkeys(role.denied):
        p.jeq(number(name), true="trap")
    for name in dict.fromkeys(role.syscalls):
        p.jeq(number(name), true="allow")
    p.ret(role.otherwise)

    if role.ioctls is not None:
        p.label("ioctl")
        p.load(bpf.data_arg_low(1))   # the kernel reads cmd as an unsigned int: low 32 bits
        for request in dict.fromkeys(role.ioctls):
            p.jeq(request, true="allow")
        p.ret(SECCOMP_RET_TRAP)

    if allow_list:
        for label, flags_arg in (("openat", 2), ("open", 1)):
            p.label(label)
            p.load(bpf.data_arg_low(flags_arg))
            p.jset(OPEN_WRITE_FLAGS, true="trap")
            p.ret(SECCOMP_RET_ERRNO | errno.EACCES)
        p.label("prot")
        p.load(bpf.data_arg_low(2))       # mmap's and mprotect's prot
        p.jset(mmap.PROT_EXEC, true="trap", false="allow")

    p.label("clone")
    p.load(bpf.data_arg_low(0))
    p.jset(CLONE_THREAD, true="allow", false="trap")

    p.label("enosys")
    p.ret(SECCOMP_RET_ERRNO | errno.ENOSYS)
    p.label("allow")
    p.ret(SECCOMP_RET_ALLOW)
    p.label("trap")
    p.ret(SECCOMP_RET_TRAP)
    p.label("kill")
    p.ret(SECCOMP_RET_KILL_PROCESS)
    return p.assemble()
