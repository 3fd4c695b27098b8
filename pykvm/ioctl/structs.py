"""ctypes mirrors of the structs in <linux/kvm.h> and <asm/kvm.h> (x86-64).

Declared once, here, in the kernel's field order and names, so a reader can
hold this file next to the header. ``tests/unit/test_abi.py`` compiles a C program
against the system header and checks every size and offset declared below.
"""

import ctypes
from ctypes import (
    Structure, Union, c_char, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64,
)

u8, u16, u32, u64, s32, s64 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32, c_int64


class KvmStruct(Structure):
    """Adds a readable repr and a byte view, which tests and snapshots use."""

    def as_dict(self) -> dict:
        result = {}
        for name, _ in self._fields_:
            value = getattr(self, name)
            if isinstance(value, (Structure, Union)):
                value = value.as_dict() if hasattr(value, "as_dict") else bytes(value)
            elif isinstance(value, ctypes.Array):
                value = [v.as_dict() if hasattr(v, "as_dict") else v for v in value]
            result[name] = value
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.as_dict()})"


def flexible(header: type, entry: type, count: int) -> type:
    """A struct with a trailing flexible array (``entries[0]`` in C) sized ``count``."""
    return type(f"{header.__name__}_{count}", (header,), {
        "_fields_": [("entries", entry * count)],
    })


# --- registers ------------------------------------------------------------------
class kvm_regs(KvmStruct):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(KvmStruct):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16),
        ("type", u8), ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
        ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8),
    ]


class kvm_dtable(KvmStruct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(KvmStruct):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(KvmStruct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
        ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
        ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32),
    ]


class kvm_msr_entry(KvmStruct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(KvmStruct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(KvmStruct):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(KvmStruct):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


class kvm_cpuid2(KvmStruct):
    _fields_ = [("nent", u32), ("padding", u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(KvmStruct):
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]


class kvm_xcr(KvmStruct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(KvmStruct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", u64 * 16)]


class kvm_xsave(KvmStruct):
    _fields_ = [("region", u32 * 1024)]


class kvm_debugregs(KvmStruct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class kvm_mp_state(KvmStruct):
    _fields_ = [("mp_state", u32)]


# --- vCPU events ------------------------------------------------------------------
class kvm_vcpu_events_exception(KvmStruct):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class kvm_vcpu_events_interrupt(KvmStruct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class kvm_vcpu_events_nmi(KvmStruct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class kvm_vcpu_events_smi(KvmStruct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events_triple_fault(KvmStruct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(KvmStruct):
    _fields_ = [
        ("exception", kvm_vcpu_events_exception),
        ("interrupt", kvm_vcpu_events_interrupt),
        ("nmi", kvm_vcpu_events_nmi),
        ("sipi_vector", u32), ("flags", u32),
        ("smi", kvm_vcpu_events_smi),
        ("triple_fault", kvm_vcpu_events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


# --- interrupt controllers and timers ----------------------------------------------
class kvm_pic_state(KvmStruct):
    _fields_ = [(name, u8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
        "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(KvmStruct):
    # redirtbl entries are 64-bit words; their bit fields are decoded where used.
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32),
                ("pad", u32), ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS)]


class kvm_irqchip_union(Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(KvmStruct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", kvm_irqchip_union)]


class kvm_pit_channel_state(KvmStruct):
    _fields_ = [
        ("count", u32), ("latched_count", u16), ("count_latched", u8),
        ("status_latched", u8), ("status", u8), ("read_state", u8), ("write_state", u8),
        ("write_latch", u8), ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8),
        ("count_load_time", s64),
    ]


class kvm_pit_state2(KvmStruct):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_pit_config(KvmStruct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_clock_data(KvmStruct):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_irq_level(KvmStruct):
    # The kernel's anonymous union {irq; status} is one u32: "irq" in, "status" out.
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irqfd(KvmStruct):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(KvmStruct):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32),
                ("pad", u8 * 36)]


class kvm_irq_routing_irqchip(KvmStruct):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(KvmStruct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class kvm_irq_routing_entry_u(Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", u32 * 8)]


class kvm_irq_routing_entry(KvmStruct):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32),
                ("u", kvm_irq_routing_entry_u)]


class kvm_irq_routing(KvmStruct):
    _fields_ = [("nr", u32), ("flags", u32)]


class kvm_msi(KvmStruct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


# --- memory and debugging --------------------------------------------------------
class kvm_userspace_memory_region(KvmStruct):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class kvm_dirty_log(KvmStruct):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_guest_debug_arch(KvmStruct):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(KvmStruct):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_translation(KvmStruct):
    _fields_ = [("linear_address", u64), ("physical_address", u64), ("valid", u8),
                ("writeable", u8), ("usermode", u8), ("pad", u8 * 5)]


class kvm_enable_cap(KvmStruct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# --- the shared kvm_run page --------------------------------------------------------
class kvm_run_io(KvmStruct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_run_mmio(KvmStruct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_internal(KvmStruct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(KvmStruct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_fail_entry(KvmStruct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_debug_exit_arch(KvmStruct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_debug(KvmStruct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_hw(KvmStruct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_ex(KvmStruct):
    _fields_ = [("exception", u32), ("error_code", u32)]


class kvm_run_msr(KvmStruct):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class kvm_run_exit(Union):
    _fields_ = [
        ("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_ex),
        ("io", kvm_run_io), ("debug", kvm_run_debug), ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
        ("msr", kvm_run_msr), ("padding", c_char * 256),
    ]


class kvm_sync_regs(KvmStruct):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_run_sync(Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * 2048)]


class kvm_run(KvmStruct):
    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", u16), ("cr8", u64), ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
        ("s", kvm_run_sync),
    ]
