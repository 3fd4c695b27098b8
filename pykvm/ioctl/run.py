"""The kvm_run page: why KVM_RUN returned, decoded (Documentation/virt/kvm/api.rst,
"The kvm_run structure", and "KVM_EXIT_IO", "KVM_EXIT_MMIO", "KVM_EXIT_INTERNAL_ERROR",
"KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_DEBUG").

Every offset here is taken from the ctypes structs in structs.py, which tests/unit/test_abi.py
compares field by field against <linux/kvm.h>; the struct.Struct formats are built from
those offsets (:func:`layout`), so they cannot drift from the kernel's layout.

Port I/O is the hot exit (every legacy device lives there): the run loop unpacks
exit_reason and kvm_run.io with one :data:`EXIT_AND_IO` unpack and builds no object for
it (bench/exits.py measures that path). The rarer exits are decoded into typed, frozen
values (:class:`MmioExit`, :class:`InternalError`, ...) for pykvm/vstate/exits.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import structs as s

EXIT_REASON_OFFSET = s.kvm_run.exit_reason.offset
IMMEDIATE_EXIT_OFFSET = s.kvm_run.immediate_exit.offset
EXIT_OFFSET = s.kvm_run.io.offset            # the exit union (anonymous in kvm_run)
# Where KVM stores the special registers at each exit once asked to (KVM_CAP_SYNC_REGS,
# kvm_run.kvm_valid_regs |= KVM_SYNC_X86_SREGS; api.rst "kvm_valid_regs").
SYNCED_SREGS_OFFSET = s.kvm_run.s.offset + s.kvm_sync_regs.sregs.offset


def layout(start: int, fields: list[tuple[int, str]]) -> struct.Struct:
    """A little-endian struct reading ``fields`` ((offset, struct code) in ascending
    order) from ``start``, with pad bytes for the gaps between them."""
    parts, at = ["<"], start
    for offset, code in fields:
        if offset < at:
            raise ValueError(f"field at {offset} overlaps the one before (ends at {at})")
        if offset > at:
            parts.append(f"{offset - at}x")
        parts.append(code)
        at = offset + struct.calcsize("<" + code)
    return struct.Struct("".join(parts))


def _at(union_member: str, struct_type, field: str) -> int:
    return getattr(s.kvm_run, union_member).offset + getattr(struct_type, field).offset


# exit_reason, then kvm_run.io: (reason, direction, size, port, count, data_offset)
EXIT_AND_IO = layout(EXIT_REASON_OFFSET, [
    (EXIT_REASON_OFFSET, "I"),
    (_at("io", s.kvm_run_io, "direction"), "B"),
    (_at("io", s.kvm_run_io, "size"), "B"),
    (_at("io", s.kvm_run_io, "port"), "H"),
    (_at("io", s.kvm_run_io, "count"), "I"),
    (_at("io", s.kvm_run_io, "data_offset"), "Q"),
])

# kvm_run.mmio: (phys_addr, data, len, is_write)
MMIO = layout(EXIT_OFFSET, [
    (_at("mmio", s.kvm_run_mmio, "phys_addr"), "Q"),
    (_at("mmio", s.kvm_run_mmio, "data"), "8s"),
    (_at("mmio", s.kvm_run_mmio, "len"), "I"),
    (_at("mmio", s.kvm_run_mmio, "is_write"), "B"),
])
MMIO_DATA_OFFSET = _at("mmio", s.kvm_run_mmio, "data")
MMIO_DATA_SIZE = 8

# A port access's data in the page at kvm_run.io.data_offset, by access size.
DATA_SIZES = (1, 2, 4, 8)
_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
DATA_UNPACK = {size: struct.Struct(f).unpack_from for size, f in _FORMATS.items()}
DATA_PACK = {size: struct.Struct(f).pack_into for size, f in _FORMATS.items()}
DATA_MASKS = {size: (1 << (8 * size)) - 1 for size in DATA_SIZES}


@dataclass(frozen=True, slots=True)
class MmioExit:
    """KVM_EXIT_MMIO: an access to guest-physical memory no slot backs. ``length`` is
    clamped to the 8 bytes of kvm_run.mmio.data."""

    addr: int
    data: bytes
    length: int
    is_write: bool

    @property
    def value(self) -> int:
        """What a write stores (little-endian)."""
        return int.from_bytes(self.data[:self.length], "little")


def mmio_exit(buf) -> MmioExit:
    addr, data, length, is_write = MMIO.unpack_from(buf, EXIT_OFFSET)
    return MmioExit(addr, data, min(length, MMIO_DATA_SIZE), bool(is_write))


def complete_mmio_read(buf, exit: MmioExit, value: int) -> None:
    """Hand a read's ``value`` to the guest (KVM copies it into the register at the next
    KVM_RUN)."""
    buf[MMIO_DATA_OFFSET:MMIO_DATA_OFFSET + exit.length] = value.to_bytes(exit.length, "little")


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR: ``suberror`` is one of KVM_INTERNAL_ERROR_*."""

    suberror: int


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """KVM_EXIT_SYSTEM_EVENT: ``kind`` is one of KVM_SYSTEM_EVENT_*."""

    kind: int


@dataclass(frozen=True, slots=True)
class FailEntry:
    """KVM_EXIT_FAIL_ENTRY: the hardware refused the vCPU state."""

    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class DebugExit:
    """KVM_EXIT_DEBUG (x86 kvm_debug_exit_arch): a breakpoint, single step or watchpoint."""

    exception: int
    pc: int
    dr6: int
    dr7: int


def internal_error(run: s.kvm_run) -> InternalError:
    return InternalError(run.internal.suberror)


def system_event(run: s.kvm_run) -> SystemEvent:
    return SystemEvent(run.system_event.type)


def fail_entry(run: s.kvm_run) -> FailEntry:
    fail = run.fail_entry
    return FailEntry(fail.hardware_entry_failure_reason, fail.cpu)


def debug_exit(run: s.kvm_run) -> DebugExit:
    arch = run.debug.arch
    return DebugExit(arch.exception, arch.pc, arch.dr6, arch.dr7)
