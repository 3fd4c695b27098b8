"""Lesson 2: after the guest stops, read what it left behind.

kvm-hello-world's last step: once the guest halts, the VMM reads a register
(KVM_GET_REGS) and a value the guest stored in its RAM. The RAM needs no ioctl
at all: it is the VMM's own mmap, so the guest's store is simply there.

    python3 guests/tutorial/vmm/02_after_the_stop.py
"""

import lesson
from pykvm.machine import MachineConfig, build_for_boot

RESULT = 0x400   # where answer.S stores 1 + 2 + ... + 100


def after_the_stop() -> tuple[int, int]:
    config = MachineConfig(mem_size=16 << 20, flat=lesson.guest("vmm-answer.bin"),
                           entry="protected")
    with build_for_boot(config) as machine:
        stop = machine.run(timeout=30)
        print(f"stopped: {stop.message if stop else 'timeout'}")
        # The vCPU thread has ended, so its registers can be read from here.
        rax = machine.vm.vcpus[0].get_regs().rax     # KVM_GET_REGS
        stored = machine.memory.read_u32(RESULT)      # a read of pykvm's own mmap
    print(f"RAX = {rax}  (KVM_GET_REGS after the halt)")
    print(f"guest memory at {RESULT:#x} = {stored}  (read from the VMM's mmap, no ioctl)")
    return rax, stored


if __name__ == "__main__":
    lesson.host_note()
    after_the_stop()
