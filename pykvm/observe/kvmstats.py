"""KVM's own counters, read through its binary statistics file descriptor.

``KVM_GET_STATS_FD`` (``_IO(KVMIO, 0xce)``, on the VM fd and on each vCPU fd)
returns a read-only fd laid out as (Documentation/virt/kvm/api.rst):

    header       struct kvm_stats_header: flags, name_size, num_desc,
                 id_offset, desc_offset, data_offset (six u32)
    id string    name_size bytes at id_offset, e.g. "kvm-1234/vcpu-0"
    descriptors  num_desc x (struct kvm_stats_desc + name_size bytes of name) at
                 desc_offset: flags (type | unit | base), exponent (s16),
                 size (u16, in u64s), offset (u32, into the data block),
                 bucket_size (u32), name
    data         u64 values at data_offset + desc.offset, read with pread()
                 whenever wanted: they are live

These are the counters of what KVM did *in the kernel*: every VM exit it
counted (``exits``), the ones it finished itself (page faults, halts, emulated
instructions, in-kernel devices), and the ones it passed to pykvm. Next to
pykvm's own count of exits that reached user space they give the
guest / kernel / user split in numbers.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from .. import ioctl as k
from ..errors import KvmError

_HEADER = struct.Struct("<6I")
_DESC = struct.Struct("<IhHII")

# flags: type in bits 0-3, unit in bits 4-7, base in bits 8-11
TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
UNITS = {0: "", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}

# Per-vCPU counters worth showing, with what they mean; the rest are shown when nonzero.
VCPU_COUNTERS = {
    "exits": "VM exits KVM counted",
    "io_exits": "port-I/O exits",
    "mmio_exits": "MMIO exits to user space",
    "halt_exits": "HLT exits",
    "irq_exits": "exits for host interrupts",
    "signal_exits": "KVM_RUN returns for a signal (pykvm's kicks)",
    "irq_window_exits": "interrupt-window exits",
    "request_irq_exits": "exits for user-space interrupt requests",
    "insn_emulation": "instructions KVM emulated",
    "insn_emulation_fail": "instructions KVM could not emulate",
    "pf_taken": "page faults KVM took",
    "pf_fixed": "page faults KVM fixed (shadow/EPT mappings)",
    "pf_guest": "page faults passed on to the guest",
    "irq_injections": "interrupts injected",
    "hypercalls": "hypercalls",
    "halt_wakeup": "wake-ups from halt",
}


@dataclass(frozen=True)
class Descriptor:
    name: str
    type: str
    unit: str
    base: int           # 10 or 2
    exponent: int       # value * base ** exponent is in `unit`
    size: int           # number of u64 values (1 for a counter, buckets for a histogram)
    offset: int
    bucket_size: int

    def scaled(self, value: int) -> float:
        return value * float(self.base) ** self.exponent


class StatsFd:
    """The binary stats of one VM or vCPU fd. ``read()`` is cheap (one pread)."""

    def __init__(self, owner_fd: int):
        self.fd = k.ioctl(owner_fd, k.KVM_GET_STATS_FD)
        try:
            self._parse()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse(self) -> None:
        header = os.pread(self.fd, _HEADER.size, 0)
        if len(header) < _HEADER.size:
            raise KvmError("KVM_GET_STATS_FD", 0)
        self.flags, self.name_size, count, id_offset, desc_offset, data_offset = \
            _HEADER.unpack(header)
        self.id = os.pread(self.fd, self.name_size, id_offset).split(b"\0")[0].decode()
        stride = _DESC.size + self.name_size
        raw = os.pread(self.fd, stride * count, desc_offset)
        self.descriptors: list[Descriptor] = []
        for i in range(count):
            flags, exponent, size, offset, bucket = _DESC.unpack_from(raw, i * stride)
            name = raw[i * stride + _DESC.size:(i + 1) * stride].split(b"\0")[0].decode()
            self.descriptors.append(Descriptor(
                name, TYPES.get(flags & 0xF, str(flags & 0xF)), UNITS.get((flags >> 4) & 0xF, "?"),
                2 if (flags >> 8) & 0xF == 1 else 10, exponent, size, offset, bucket))
        self.data_offset = data_offset
        self.data_size = max((d.offset + 8 * d.size for d in self.descriptors), default=0)

    def read(self) -> dict[str, int | list[int]]:
        """name -> value (an int; a list of bucket counts for a histogram)."""
        data = os.pread(self.fd, self.data_size, self.data_offset)
        values: dict[str, int | list[int]] = {}
        for d in self.descriptors:
            if d.offset + 8 * d.size > len(data):
                continue
            items = struct.unpack_from(f"<{d.size}Q", data, d.offset)
            values[d.name] = items[0] if d.size == 1 and not d.type.endswith("hist") else list(items)
        return values

    def descriptor(self, name: str) -> Descriptor | None:
        return next((d for d in self.descriptors if d.name == name), None)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


Counters = dict[str, "int | list[int]"]   # a counter's name -> its value (buckets: a list)


@dataclass(frozen=True)
class KernelCounters:
    """One reading of KVM's counters: the VM's and each vCPU's (in vCPU order), or,
    when ``available`` is false, the ``reason`` there are none. The names are KVM's
    own (its descriptors say which exist), so they stay a mapping."""

    available: bool
    vm: Counters = field(default_factory=dict)
    vcpus: tuple[Counters, ...] = ()
    reason: str = ""

    def vcpu(self, index: int) -> Counters | None:
        """vCPU ``index``'s counters, None when there are none."""
        return self.vcpus[index] if self.available and 0 <= index < len(self.vcpus) else None


class KvmStats:
    """KVM's counters for a VM and each of its vCPUs; ``available`` False (with
    ``reason``) on a kernel without KVM_CAP_BINARY_STATS_FD (before Linux 5.14)."""

    def __init__(self, vm):
        self.vm_stats: StatsFd | None = None
        self.vcpu_stats: list[StatsFd] = []
        self.reason = ""
        if not vm.kvm.check_extension(k.KVM_CAP_BINARY_STATS_FD):
            self.reason = "this kernel has no KVM_CAP_BINARY_STATS_FD (Linux < 5.14)"
            return
        try:
            self.vm_stats = StatsFd(vm.fd)
            for vcpu in vm.vcpus:
                self.vcpu_stats.append(StatsFd(vcpu.fd))
        except KvmError as error:
            self.close()
            self.reason = f"KVM_GET_STATS_FD failed: {error}"
        vm.on_close(self.close)

    @property
    def available(self) -> bool:
        return self.vm_stats is not None

    def snapshot(self) -> KernelCounters:
        """The counters now (a pread per fd: they are live)."""
        if not self.available:
            return KernelCounters(False, reason=self.reason or "closed with its VM")
        return KernelCounters(True, self.vm_stats.read(),
                              tuple(stats.read() for stats in self.vcpu_stats))

    def close(self) -> None:
        for stats in [self.vm_stats, *self.vcpu_stats]:
            if stats is not None:
                stats.close()
        self.vm_stats, self.vcpu_stats = None, []


def kernel_split(kvm_vcpu: Counters, pykvm_exits: int) -> dict[str, int]:
    """The split of one vCPU's exits: counted by KVM, reached pykvm, finished in the kernel."""
    exits = kvm_vcpu.get("exits")
    if not isinstance(exits, int):
        return {}
    return {"kvm_exits": exits, "to_pykvm": pykvm_exits,
            "in_kernel": max(exits - pykvm_exits - kvm_vcpu.get("signal_exits", 0), 0),
            "signal_exits": kvm_vcpu.get("signal_exits", 0)}


CANNOT_SEPARATE = (
    "not separable from user space: time inside KVM_RUN is guest code *and* KVM's in-kernel "
    "work (exits it finished, instruction emulation, halted waits); KVM counts exits, not the "
    "time they took; on a host that emulates guest ring 0 (kvm_pvm) that code shows as "
    "insn_emulation, not as exits")
