"""Lesson 1: your first VMM, in about sixty lines of ioctl() calls.

The same steps as LWN's "Using the KVM API" and kvm-hello-world, with only
pykvm.ioctl (the structs of <linux/kvm.h> and libc's ioctl): open /dev/kvm, make
a VM, give it memory, make a vCPU, set its registers, and call KVM_RUN until the
guest halts, printing every exit. The kernel's documentation of each ioctl:
Documentation/virt/kvm/api.rst.

    python3 guests/tutorial/vmm/01_first_vmm.py
"""

import ctypes
import mmap
import os

import lesson
from pykvm import ioctl as k
from pykvm.ioctl import structs as s

# The guest, 16-bit real mode, hand-assembled (LWN's example): print AL + BL as a digit.
CODE = bytes([
    0xBA, 0xF8, 0x03,  # mov $0x3f8, %dx     COM1's data port
    0x00, 0xD8,        # add %bl, %al        AL = 2 + 2
    0x04, ord("0"),    # add $'0', %al       the digit
    0xEE,              # out %al, (%dx)      -> KVM_EXIT_IO
    0xB0, ord("\n"),   # mov $'\n', %al
    0xEE,              # out %al, (%dx)      -> KVM_EXIT_IO
    0xF4,              # hlt                 -> KVM_EXIT_HLT
])
GUEST_ADDR, MEM_SIZE = 0x1000, 0x1000


def first_vmm() -> list[str]:
    """Run the guest with raw ioctls; return the exits in order, as printed."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    print("KVM_GET_API_VERSION ->", k.ioctl(kvm, k.KVM_GET_API_VERSION))
    vm = k.ioctl(kvm, k.KVM_CREATE_VM, 0)
    print("KVM_CREATE_VM -> VM fd", vm)
    ram = mmap.mmap(-1, MEM_SIZE)                 # anonymous memory: the guest's RAM
    ram[0:len(CODE)] = CODE
    host_addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    k.ioctl(vm, k.KVM_SET_USER_MEMORY_REGION, s.kvm_userspace_memory_region(
        slot=0, guest_phys_addr=GUEST_ADDR, memory_size=MEM_SIZE, userspace_addr=host_addr))
    print(f"KVM_SET_USER_MEMORY_REGION: guest {GUEST_ADDR:#x}+{MEM_SIZE:#x} = host {host_addr:#x}")
    vcpu = k.ioctl(vm, k.KVM_CREATE_VCPU, 0)
    run_size = k.ioctl(kvm, k.KVM_GET_VCPU_MMAP_SIZE)
    run_map = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    run = s.kvm_run.from_buffer(run_map)          # KVM writes each exit's details here
    print(f"KVM_CREATE_VCPU -> vCPU fd {vcpu}; kvm_run mapped ({run_size} bytes)")
    sregs = s.kvm_sregs()
    k.ioctl(vcpu, k.KVM_GET_SREGS, sregs)
    sregs.cs.base, sregs.cs.selector = 0, 0        # real mode, CS base 0
    k.ioctl(vcpu, k.KVM_SET_SREGS, sregs)
    k.ioctl(vcpu, k.KVM_SET_REGS, s.kvm_regs(rip=GUEST_ADDR, rax=2, rbx=2, rflags=0x2))
    print(f"KVM_SET_SREGS, KVM_SET_REGS: rip={GUEST_ADDR:#x} rax=2 rbx=2")
    exits = []
    while True:
        k.ioctl(vcpu, k.KVM_RUN)
        if run.exit_reason == k.KVM_EXIT_IO and run.io.direction == k.KVM_EXIT_IO_OUT:
            byte = run_map[run.io.data_offset]     # the data sits inside kvm_run
            exits.append(f"KVM_EXIT_IO out port={run.io.port:#x} data={chr(byte)!r}")
        elif run.exit_reason == k.KVM_EXIT_HLT:
            exits.append("KVM_EXIT_HLT")
        else:
            exits.append(f"unexpected exit {k.EXIT_NAMES.get(run.exit_reason)}")
        print("KVM_RUN ->", exits[-1])
        if run.exit_reason != k.KVM_EXIT_IO:
            break
    del run
    for resource in (run_map, ram):
        resource.close()
    for fd in (vcpu, vm, kvm):
        os.close(fd)
    return exits


def with_pykvm() -> None:
    """The same guest through pykvm's classes, and where each ioctl above went."""
    from pykvm.kvm import Kvm
    from pykvm.memory import GuestMemory
    from pykvm.vstate.vm import Vm

    print("\nthe same guest through pykvm's Kvm, GuestMemory, Vm and Vcpu:")
    with Kvm() as kvm, GuestMemory.anonymous(1 << 20) as memory, Vm(kvm, memory) as vm:
        memory.write(GUEST_ADDR, CODE)
        vcpu = vm.create_vcpus(1)[0]
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(s.kvm_regs(rip=GUEST_ADDR, rax=2, rbx=2, rflags=0x2))
        vm.add_pio_device(0x3F8, 1, Printer())
        stop = vm.run(timeout=10)
    print(f"  stopped: {stop.message if stop else 'timeout'}")
    print("  (no KVM_EXIT_HLT this time: pykvm's VM has KVM's in-kernel interrupt controllers,\n"
          "  so `hlt` waits inside KVM for an interrupt; pykvm noticed the vCPU halted with\n"
          "  interrupts off and ended the VM)")
    print("  KVM_GET_API_VERSION           -> Kvm() (pykvm/kvm.py)\n"
          "  KVM_CREATE_VM, _USER_MEMORY_REGION -> Vm() (pykvm/vstate/vm.py: _create_platform)\n"
          "  mmap of the RAM               -> GuestMemory.anonymous (pykvm/memory.py)\n"
          "  KVM_CREATE_VCPU, kvm_run mmap -> Vm.create_vcpus -> Vcpu() (pykvm/vstate/vcpu.py)\n"
          "  KVM_SET_SREGS/REGS            -> Vcpu.set_sregs/set_regs\n"
          "  the KVM_RUN loop              -> Vcpu.run_loop, on a thread per vCPU;\n"
          "                                   KVM_EXIT_IO goes to the device on vm.pio_bus")


class Printer(lesson.Device):
    """Port 0x3f8 for the pykvm run: print what the guest writes."""
    name = "printer"

    def write(self, offset: int, size: int, value: int) -> None:
        print(f"  Printer.write(port 0x3f8, {chr(value)!r})  <- the KVM_EXIT_IO, dispatched")


if __name__ == "__main__":
    lesson.host_note()
    first_vmm()
    with_pykvm()
