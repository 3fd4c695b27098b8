"""Lesson 5: write your own device, and watch the guest use it.

Part 1, a port-I/O device in a dozen lines: subclass pykvm.bus.Device, answer
read() and write(), register it on the VM's port-I/O bus. The guest (device.S)
sends each byte of a sentence to port 0x510 and reads it back upper-cased:
every `out` and `in` is a KVM_EXIT_IO that pykvm's vCPU loop hands to your
write() or read().

Part 2, a virtio device: the same idea at the scale real devices need. Instead
of one exit per byte, the driver puts whole buffers in a queue in guest RAM
and rings a doorbell once (an ioeventfd, lesson 3); the device's thread takes
the buffers, writes its answer into the driver's buffers, puts them on the used
ring and interrupts (an irqfd, lesson 4). Here the driver's side is pykvm's
Python stand-in for a guest driver (pykvm/devices/virtio/driver.py, what the
tests use), so both sides of the queue print what they do.

    python3 guests/tutorial/vmm/05_your_device.py
"""

import io
import time

import lesson
from pykvm.devices.virtio.device import VirtioDevice
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.queue import scatter
from pykvm.machine import MachineConfig, build_for_boot
from pykvm.memory import GuestMemory

UPCASE_PORT = 0x510


class Upcase(lesson.Device):
    """Port 0x510: write a byte, read it back upper-cased."""
    name = "upcase"

    def __init__(self):
        self.byte = 0
        self.calls = 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.byte, self.calls = value & 0xFF, self.calls + 1

    def read(self, offset: int, size: int) -> int:
        self.calls += 1
        return bytes([self.byte]).upper()[0]


def port_device() -> tuple[bytes, int]:
    """Part 1: run device.S with an Upcase on port 0x510; its output and the calls."""
    config = MachineConfig(mem_size=16 << 20, flat=lesson.guest("vmm-device.bin"),
                           entry="protected")
    output = io.BytesIO()
    upcase = Upcase()
    with build_for_boot(config, stdout=output) as machine:
        machine.vm.add_pio_device(UPCASE_PORT, 1, upcase)   # your device, on the bus
        machine.run(timeout=30)
    print(f"the guest printed: {output.getvalue().decode(errors='replace')}", end="")
    print(f"Upcase.read/write were called {upcase.calls} times (one exit each)")
    return output.getvalue(), upcase.calls


class Echo(VirtioDevice):
    """A virtio device: each request's readable buffer comes back, upper-cased, in its
    writable buffer. Runs on the device's own thread, woken by the queue's eventfd.
    (ID 0x2a is not an assigned virtio device ID: a lesson device.)"""
    device_id, name, queue_sizes = 0x2A, "virtio-echo", (8,)

    def process_queue(self, index, queue):
        while (chain := queue.pop()) is not None:
            request = b"".join(bytes(view) for view in chain.readable)
            print(f"  device: popped chain {chain.head}: {request!r}")
            queue.add_used(chain.head, scatter(chain.writable, request.upper()))


def virtio_device() -> bytes:
    """Part 2: an "echo" virtio device, driven through a split virtqueue."""
    RING, REQUEST, REPLY = 0x10000, 0x20000, 0x21000
    with GuestMemory.anonymous(1 << 20) as memory:
        vm = StandInVm(memory)
        line = RecordingLine(24)
        function = VirtioPciDevice(vm, memory, Echo(), interrupt_lines=[line, line])
        driver = PciDriver(function)                       # the guest driver's side
        driver.negotiate(1 << 32)                          # VIRTIO_F_VERSION_1
        ring = DriverRing(memory, RING, 8)
        driver.setup_queue(0, ring, vector=0xFFFF)
        driver.driver_ok()
        text = b"hello, virtio"
        memory.write(REQUEST, text)
        head = ring.add_chain([(REQUEST, len(text), False), (REPLY, 64, True)])
        print(f"  driver: chain {head} = [{len(text)} readable bytes, 64 writable], "
              f"avail idx {ring.avail_idx}; notify")
        driver.notify(0)                                   # the doorbell
        deadline = time.monotonic() + 5
        while ring.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)                              # the device's thread answers
        (used_head, written), = ring.take_used()
        reply = memory.read(REPLY, written)
        print(f"  driver: used ring gave back chain {used_head}, {written} bytes: {reply!r}")
        function.close()
        vm.close()
    return reply


if __name__ == "__main__":
    lesson.host_note()
    print("part 1: a port-I/O device")
    port_device()
    print("part 2: a virtio device and its queue")
    virtio_device()
