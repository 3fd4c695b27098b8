"""/dev/kvm: the system handle. API version, capabilities, supported CPUID and
MSRs, and which kind of KVM this host runs (so quirks can be chosen by probing,
never by reading cpuinfo flags)."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from . import ioctl as k
from .errors import KvmError, KvmUnavailable, NotKvmDevice
from .ioctl import structs as s

DEFAULT_DEVICE = "/dev/kvm"

# Which module provides /dev/kvm. kvm_pvm is the pagetable-based KVM for nested
# use (no VT-x/AMD-V visible to the host); it needs the workarounds in pykvm.quirks.
HOST_KINDS = ("kvm_pvm", "kvm_intel", "kvm_amd")


def detect_host_kind(sys_module: Path = Path("/sys/module")) -> str:
    override = os.environ.get("PYKVM_HOST_KIND")
    if override:
        return override
    for kind in HOST_KINDS:
        if (sys_module / kind).exists():
            return kind
    return "unknown"


@dataclass(frozen=True)
class CapabilityReport:
    name: str
    value: int


class Kvm:
    """An open /dev/kvm. Use as a context manager, or call close()."""

    def __init__(self, device: str = DEFAULT_DEVICE):
        self.device = device
        self.fd = open_device(device)
        try:
            version = api_version(device, self.fd)
            if version != k.KVM_API_VERSION:
                raise KvmUnavailable(
                    f"{device} speaks KVM API version {version}, pykvm needs {k.KVM_API_VERSION}")
            self.api_version = version
            self.vcpu_mmap_size = k.ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE)
            self.host_kind = detect_host_kind()
        except BaseException:
            os.close(self.fd)
            raise
        self._supported_cpuid: list[s.kvm_cpuid_entry2] | None = None
        self._msr_indices: list[int] | None = None

    # --- capabilities ---------------------------------------------------------------
    def check_extension(self, capability: int) -> int:
        return k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, capability)

    def capabilities(self) -> dict[str, int]:
        """Every capability pykvm knows of, by name, with the value KVM reports."""
        return {name: self.check_extension(number)
                for number, name in sorted(k.CAPABILITY_NAMES.items())}

    def require(self, *capabilities: int) -> None:
        missing = [k.CAPABILITY_NAMES[c] for c in capabilities if not self.check_extension(c)]
        if missing:
            raise KvmUnavailable(f"{self.device} lacks capabilities pykvm needs: {', '.join(missing)}")

    # --- CPUID and MSRs --------------------------------------------------------------
    def supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID, growing the buffer until it fits (E2BIG)."""
        if self._supported_cpuid is None:
            self._supported_cpuid = _grow_until_fits(
                lambda n: s.flexible(s.kvm_cpuid2, s.kvm_cpuid_entry2, n),
                lambda buf, n: setattr(buf, "nent", n),
                lambda buf: list(buf.entries[:buf.nent]),
                self.fd, k.KVM_GET_SUPPORTED_CPUID)
        return [copy_struct(e) for e in self._supported_cpuid]

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (what a snapshot must carry)."""
        if self._msr_indices is None:
            self._msr_indices = _grow_until_fits(
                lambda n: type("kvm_msr_list_n", (s.kvm_msr_list,),
                               {"_fields_": [("indices", ctypes.c_uint32 * n)]}),
                lambda buf, n: setattr(buf, "nmsrs", n),
                lambda buf: list(buf.indices[:buf.nmsrs]),
                self.fd, k.KVM_GET_MSR_INDEX_LIST)
        return list(self._msr_indices)

    # --- VMs ---------------------------------------------------------------------------
    def create_vm_fd(self) -> int:
        return k.ioctl(self.fd, k.KVM_CREATE_VM, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_device(device: str) -> int:
    """Open /dev/kvm, turning each way it can fail into one clear sentence."""
    try:
        return os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailable(
            f"{device} does not exist: KVM is not available here (kvm module not loaded, "
            "or hardware virtualization disabled or not exposed to this machine)") from None
    except PermissionError:
        raise KvmUnavailable(
            f"no permission to open {device}: run as root or add your user to the group "
            f"that owns it (usually 'kvm')") from None
    except IsADirectoryError:
        raise NotKvmDevice(f"{device} is a directory, not a KVM device") from None
    except OSError as error:
        raise KvmUnavailable(f"cannot open {device}: {error.strerror}") from None


def api_version(device: str, fd: int) -> int:
    """KVM_GET_API_VERSION, the first thing asked of a KVM fd: if it fails, ``device``
    is some other file (/dev/null, a regular file), and the error says so."""
    try:
        return k.ioctl(fd, k.KVM_GET_API_VERSION)
    except KvmError as error:
        name = errno.errorcode.get(error.errno, str(error.errno))
        raise NotKvmDevice(f"{device} is not a KVM device: KVM_GET_API_VERSION failed with "
                           f"{name} ({os.strerror(error.errno)}); give the KVM device "
                           f"(usually {DEFAULT_DEVICE}) to --device") from None


def copy_struct(struct):
    return type(struct).from_buffer_copy(struct)


def _grow_until_fits(make_type, set_count, read_entries, fd: int, request: int, start: int = 64):
    count = start
    while count <= 1 << 16:
        buffer = make_type(count)()
        set_count(buffer, count)
        try:
            k.ioctl(fd, request, buffer)
        except KvmError as error:
            if error.errno == errno.E2BIG:
                count *= 2
                continue
            raise
        return read_entries(buffer)
    raise KvmUnavailable(f"{k.request_name(request)}: the kernel's list keeps growing")
