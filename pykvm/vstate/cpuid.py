"""Each vCPU's CPUID: the host's supported leaves, made that vCPU's (its APIC ID) and
told one topology, one package of N single-thread cores, the same way by every leaf a
guest may read (Intel SDM vol. 2A "CPUID"; AMD APM vol. 3 appendix E)."""

from __future__ import annotations

from .. import ioctl as k
from ..ioctl import structs as s


def vcpu_cpuid(supported: list[s.kvm_cpuid_entry2], vcpu_id: int, count: int):
    """The supported CPUID, made this vCPU's: its APIC ID, and a topology of one package
    with ``count`` cores of one thread each, told the same way by every leaf a guest may
    read (Intel: 1, 4, 0xB, 0x1F; AMD: 0x80000001, 0x80000008, 0x8000001D, 0x8000001E)."""
    count = max(count, 1)
    core_bits = (count - 1).bit_length()   # APIC ID bits that number the cores
    entries = []
    for entry in supported:
        entry = s.kvm_cpuid_entry2.from_buffer_copy(entry)
        function = entry.function
        if function == 1:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000FFFF) | (vcpu_id << 24) | (count << 16)
            entry.edx |= 1 << 28  # HTT: the count in EBX[23:16] is valid
        elif function == 4:
            if entry.eax & 0x1F:   # a cache: cores per package - 1, and who shares it
                shared = count - 1 if (entry.eax >> 5) & 7 == 3 else 0   # L3: all; L1/L2: one
                entry.eax = (entry.eax & 0x3FFF) | (shared << 14) | ((count - 1) << 26)
        elif function in (0xB, 0x1F):
            if entry.index != 0:
                continue          # the levels are rebuilt below from sub-leaf 0
            entries.extend(_extended_topology(function, vcpu_id, count, core_bits))
            continue
        elif function == 0x80000001:
            # ECX bit 1 CmpLegacy: the HTT count is cores, not threads (AMD)
            entry.ecx = entry.ecx | 2 if count > 1 else entry.ecx & ~2
        elif function == 0x80000008:
            # ECX[15:12] APIC ID bits for the core, ECX[7:0] cores - 1 (AMD)
            entry.ecx = (entry.ecx & ~0xF0FF) | (core_bits << 12) | (count - 1)
        elif function == 0x8000001D:
            if entry.eax & 0x1F:   # AMD cache topology: EAX[25:14] sharing logical CPUs - 1
                shared = count - 1 if (entry.eax >> 5) & 7 == 3 else 0
                entry.eax = (entry.eax & ~(0xFFF << 14)) | (shared << 14)
        elif function == 0x8000001E:
            # EAX extended APIC ID; EBX[15:8] threads per core - 1, EBX[7:0] core ID;
            # ECX[10:8] nodes per package - 1, ECX[7:0] node ID
            entry.eax, entry.ebx, entry.ecx, entry.edx = vcpu_id, vcpu_id & 0xFF, 0, 0
        entries.append(entry)
    return entries


def _extended_topology(function: int, vcpu_id: int, count: int, core_bits: int):
    """Leaf 0xB (or 0x1F) sub-leaves: SMT level (1 thread), core level (``count`` cores),
    then the invalid level that ends the list. EDX is the x2APIC ID in each."""
    levels = [(0, 1, 1), (core_bits, count, 2), (0, 0, 0)]   # (shift, CPUs, level type)
    out = []
    for index, (shift, cpus, level_type) in enumerate(levels):
        entry = s.kvm_cpuid_entry2(function=function, index=index,
                                   flags=k.KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
        entry.eax, entry.ebx, entry.ecx, entry.edx = shift, cpus, (level_type << 8) | index, vcpu_id
        out.append(entry)
    return out
