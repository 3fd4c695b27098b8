"""ioctl request numbers, capabilities, exit reasons and flag values of KVM.

Request numbers are computed with the kernel's own _IOC encoding from the
struct each request carries, so a struct's size and its request cannot drift
apart; ``tests/unit/test_abi.py`` compares every value with the C header's.
"""

import ctypes

from . import structs as s

# --- the _IOC encoding (include/uapi/asm-generic/ioctl.h) -------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) \
        | (size << _IOC_SIZESHIFT)


def _size(struct) -> int:
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


def _IO(type_, nr):
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_, nr, struct):
    return _IOC(_IOC_READ, type_, nr, _size(struct))


def _IOW(type_, nr, struct):
    return _IOC(_IOC_WRITE, type_, nr, _size(struct))


def _IOWR(type_, nr, struct):
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, _size(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- system (/dev/kvm) ioctls ---------------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, s.kvm_cpuid2)
KVM_GET_EMULATED_CPUID = _IOWR(KVMIO, 0x09, s.kvm_cpuid2)
KVM_GET_MSR_FEATURE_INDEX_LIST = _IOWR(KVMIO, 0x0A, s.kvm_msr_list)

# --- VM ioctls -------------------------------------------------------------------------
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, s.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, s.kvm_irqchip)
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, s.kvm_irq_level)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, s.kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, s.kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, s.kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, s.kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, s.kvm_pit_state2)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, s.kvm_enable_cap)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, s.kvm_msi)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)

# --- vCPU ioctls -----------------------------------------------------------------------
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, s.kvm_translation)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, s.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, s.kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, s.kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, s.kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, s.kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, s.kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, s.kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, s.kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, s.kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, s.kvm_xcrs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)

REQUEST_NAMES = {value: name for name, value in dict(globals()).items()
                 if name.startswith("KVM_") and isinstance(value, int) and value > 0xFFFF}
# Two requests share a number with others (the encoding reuses nr on different fds).
REQUEST_NAMES[KVM_GET_VCPU_EVENTS] = "KVM_GET_VCPU_EVENTS/KVM_GET_PIT2"
REQUEST_NAMES[KVM_SET_VCPU_EVENTS] = "KVM_SET_VCPU_EVENTS/KVM_SET_PIT2"

# --- capabilities (KVM_CHECK_EXTENSION) ------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_IOMMU = 18
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_SET_BOOT_CPU_ID = 34
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_SYNC_REGS = 74
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_XSAVE2 = 208

CAPABILITY_NAMES = {value: name[len("KVM_CAP_"):] for name, value in dict(globals()).items()
                    if name.startswith("KVM_CAP_")}

# --- exit reasons --------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

EXIT_NAMES = {value: name[len("KVM_EXIT_"):].lower() for name, value in dict(globals()).items()
              if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# KVM_EXIT_INTERNAL_ERROR suberrors
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# KVM_EXIT_SYSTEM_EVENT types
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# --- flags ---------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_PIT_SPEAKER_DUMMY = 1
KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_CLOCK_TSC_STABLE = 2

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
