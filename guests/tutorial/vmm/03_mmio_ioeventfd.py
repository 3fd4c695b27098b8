"""Lesson 3: an MMIO doorbell, first as an exit to Python, then as an ioeventfd.

The guest (doorbell.S) stores to DOORBELL 1000 times. Run 1: a Python device
sits on pykvm's MMIO bus; every store is a KVM_EXIT_MMIO whose kvm_run.mmio
carries the address, the length and the data, and pykvm's vCPU loop hands it
to the device. Run 2: the same address is an ioeventfd (KVM_IOEVENTFD); KVM
adds 1 to the eventfd's counter in the kernel and resumes the guest: no exit
reaches Python, and the device learns of all 1000 rings with one read(). This is
how virtio devices' queue notifications work in pykvm (pykvm/devices/virtio).

    python3 guests/tutorial/vmm/03_mmio_ioeventfd.py
"""

import os
from dataclasses import dataclass

import lesson
from pykvm import ioctl as k
from pykvm.machine import MachineConfig, build_for_boot

DOORBELL, RINGS = 0xD0000000, 1000


class Doorbell(lesson.Device):
    """The MMIO device of run 1: remembers each write's address and value."""
    name = "doorbell"

    def __init__(self):
        self.writes: list[tuple[int, int, int]] = []   # (address, size, value)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((DOORBELL + offset, size, value))


@dataclass
class Run:
    mmio_exits: int      # KVM_EXIT_MMIO exits that reached pykvm
    seconds: float       # the loop's time, between the guest's markers 1 and 2
    seen: int            # doorbells the host side learnt of


def run(wire) -> Run:
    """Run doorbell.S; ``wire(vm)`` sets the doorbell up and returns a function that
    counts, once the guest has stopped, the doorbells the host side saw."""
    config = MachineConfig(mem_size=16 << 20, flat=lesson.guest("vmm-doorbell.bin"),
                           entry="protected")
    with build_for_boot(config) as machine:
        count = wire(machine.vm)
        stop = machine.run(timeout=60)
        if stop is None or stop.status != 0:
            raise SystemExit(f"the guest did not finish: {stop}")
        marks = dict(machine.progress)
        return Run(machine.vm.vcpus[0].stats.exits[k.KVM_EXIT_MMIO], marks[2] - marks[1],
                   count())


def with_a_device(vm):
    device = Doorbell()
    vm.add_mmio_device(DOORBELL, 4, device)

    def count():
        for address, size, value in device.writes[:3]:
            print(f"KVM_EXIT_MMIO write addr={address:#x} len={size} data={value}")
        return len(device.writes)
    return count


def with_an_ioeventfd(vm):
    fd = vm.new_eventfd()                        # closed with the VM
    vm.add_ioeventfd(DOORBELL, 4, fd)            # KVM_IOEVENTFD: 4-byte writes to DOORBELL
    return lambda: os.eventfd_read(fd)           # the counter: every ring since the last read


def doorbells() -> tuple[Run, Run]:
    print(f"run 1: a Python device on the MMIO bus at {DOORBELL:#x}")
    slow = run(with_a_device)
    print(f"  ... {slow.mmio_exits} KVM_EXIT_MMIO exits reached pykvm, the device saw "
          f"{slow.seen} writes: {lesson.per_exit(slow.seconds, RINGS)} per doorbell")
    print(f"run 2: an ioeventfd on {DOORBELL:#x}")
    fast = run(with_an_ioeventfd)
    print(f"  ... {fast.mmio_exits} KVM_EXIT_MMIO exits reached pykvm, the eventfd counted "
          f"{fast.seen} rings: {lesson.per_exit(fast.seconds, RINGS)} per doorbell")
    print(f"  (measured just now, on this host; run 1 / run 2 = {slow.seconds / fast.seconds:.1f})")
    return slow, fast


if __name__ == "__main__":
    lesson.host_note()
    doorbells()
