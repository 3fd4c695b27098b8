"""Lesson 4: interrupts, from KVM's own timer and from a Python "device", to the
guest's IDT handlers while it waits in `hlt`.

pykvm's VM has KVM's in-kernel interrupt controllers (KVM_CREATE_IRQCHIP: two
8259 PICs, an IOAPIC, a local APIC per vCPU) and timer (KVM_CREATE_PIT2). The
guest (interrupt.S) points vectors 0x20 and 0x25 at its handlers, programs the
PIC, and waits in `hlt`:

1. for three ticks of the PIT, which it programs itself. Timer, PIC, LAPIC and
   delivery are all KVM's, in the kernel: pykvm takes no part at all.
2. for three interrupts from a "device": a thread here writes an eventfd that
   KVM_IRQFD tied to GSI 5.
   - pykvm (user space): the thread's write(2) to the eventfd. That is all.
   - KVM (kernel): the irqfd raises IRQ 5 on the PIC, the PIC passes vector
     0x25 to the LAPIC, the LAPIC wakes the halted vCPU and delivers the
     interrupt through the guest's IDT.
   - guest: the handler counts and prints; `hlt` returns; after three, it exits.

The guest's PIT and PIC programming and its EOIs are port I/O that KVM handles
in the kernel too: the port counts printed at the end show none of them.
Compare lesson 3: an ioeventfd is guest -> host without an exit, an irqfd is
host -> guest without an ioctl from the vCPU loop.

    python3 guests/tutorial/vmm/04_interrupts.py
"""

import os
import threading

import lesson
from pykvm.machine import MachineConfig, build_for_boot

DEVICE_GSI = 5
PERIOD = 0.05       # seconds between two interrupts


def device(fd: int, stop: threading.Event) -> None:
    """A device that interrupts every PERIOD seconds, until the VM stops."""
    while not stop.wait(PERIOD):
        os.eventfd_write(fd, 1)


def interrupts() -> dict[str, int]:
    config = MachineConfig(mem_size=16 << 20, flat=lesson.guest("vmm-interrupt.bin"),
                           entry="long", stats=True)
    with build_for_boot(config) as machine:
        vm = machine.vm
        fd = vm.new_eventfd()
        vm.add_irqfd(fd, DEVICE_GSI)             # KVM_IRQFD: a write to fd raises GSI 5
        stop = threading.Event()
        thread = threading.Thread(target=device, args=(fd, stop), daemon=True)
        thread.start()
        result = machine.run(timeout=60)
        stop.set()
        thread.join()
        stats = vm.vcpus[0].stats
        ports = {index >> 1: count for index, count in enumerate(stats.port_counts) if count}
    print(f"stopped: {result.message if result else 'timeout'}")
    print("port-I/O exits that reached pykvm, by port:",
          ", ".join(f"{port:#x}: {count}" for port, count in sorted(ports.items())))
    print("(no 0x20/0x21 or 0x40/0x43: the PIC and PIT programming and the EOIs were "
          "finished in the kernel)")
    return ports


if __name__ == "__main__":
    lesson.host_note()
    interrupts()
