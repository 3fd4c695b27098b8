"""vhost-user completions straight to KVM (issue #16): a back end signals the KVM
irqfd of its queue's MSI-X vector itself while that vector delivers, and pykvm's own
call eventfd while it does not (masked, MSI-X off, no vector), so a masked vector's
interrupt becomes its pending bit and is delivered at unmask (virtio 1.2 4.1.5.x,
PCI 3.0 6.8.2.9). The recording fake back end of test_vhost_user gets the fds; each
check signals the fd the back end holds and looks where the signal lands: on the
vector's irqfd eventfd (what KVM would consume) or through pykvm's line.
"""

import os

import pytest

from pykvm.devices.pci.msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK, NO_VECTOR
from pykvm.devices.virtio.device import STATUS_DRIVER_OK, VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.fs import FsDevice
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.memory import GuestMemory
from pykvm.vhost_user.frontend import Frontend
from pykvm.vhost_user.protocol import Request

from ..fakes import wait_for
from ..unit.test_vhost_user import FakeBackend

VECTORS = 3     # two queues + config


class IrqfdLine(RecordingLine):
    """An MSI-X line with the eventfd KVM would own (KVM_IRQFD): ``fired`` reads and
    clears it, as KVM's irqfd does when it injects."""

    def __init__(self, gsi: int):
        super().__init__(gsi)
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def fired(self) -> bool:
        try:
            return os.eventfd_read(self.fd) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def live(tmp_path):
    """A virtio-fs function with MSI-X on, vector i unmasked for queue i, at DRIVER_OK."""
    backend = FakeBackend(tmp_path / "backend.sock")
    lines = [IrqfdLine(24 + i) for i in range(VECTORS)]
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        device = FsDevice(Frontend.connect(str(tmp_path / "backend.sock"), "virtio-fs0"), "t")
        function = VirtioPciDevice(vm, memory, device, interrupt_lines=lines)
        driver = PciDriver(function)
        set_control(function, CONTROL_ENABLE)
        for vector in range(VECTORS):
            set_masked(function, vector, False)
        assert driver.negotiate(VIRTIO_F_VERSION_1) & 8
        for index in range(2):
            driver.setup_queue(index, DriverRing(memory, 0x100000 + index * 0x10000, 128),
                               vector=index)
        driver.driver_ok()
        assert driver.status() & STATUS_DRIVER_OK
        try:
            yield function, backend, lines, driver
        finally:
            function.close()
            vm.close()
            backend.close()
            for line in lines:
                line.close()


def set_control(function, value: int) -> None:
    function.config.write(function.msix.offset + 2, 2, value)


def set_masked(function, vector: int, masked: bool) -> None:
    function.msix.write(16 * vector + 12, 4, int(masked))


def calls_sent(backend) -> int:
    return backend.names().count("SET_VRING_CALL")


def direct(backend, lines, index: int) -> bool:
    """Signal queue ``index``'s call fd as the back end would; True if the vector's
    irqfd got it with no pykvm thread involved."""
    before = lines[index].triggered
    os.eventfd_write(backend.calls[index], 1)
    hit = wait_for(lambda: lines[index].fired(), timeout=0.5)
    return bool(hit) and lines[index].triggered == before


def test_an_unmasked_vector_gets_the_back_end_s_signal_with_no_pykvm_thread(live):
    function, backend, lines, _ = live
    assert calls_sent(backend) == 2            # one per queue, at DRIVER_OK: no swaps yet
    for index in range(2):
        assert direct(backend, lines, index)
        assert function.msix.delivered[index] == 0     # pykvm never saw it


def test_a_masked_vector_s_interrupt_is_pending_until_unmask(live):
    function, backend, lines, _ = live
    set_masked(function, 0, True)
    assert calls_sent(backend) == 3            # queue 0 moved to pykvm's eventfd
    os.eventfd_write(backend.calls[0], 1)
    assert wait_for(lambda: function.msix.pending(0))
    assert not lines[0].fired() and lines[0].triggered == 0
    assert direct(backend, lines, 1)           # the other queue's vector is untouched
    set_masked(function, 0, False)
    assert calls_sent(backend) == 4            # back to the irqfd
    assert lines[0].triggered == 1 and not function.msix.pending(0)   # the pending one
    assert direct(backend, lines, 0)


def test_function_mask_and_msix_off_take_every_queue_off_the_direct_path(live):
    function, backend, lines, driver = live
    set_control(function, CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
    assert calls_sent(backend) == 4
    os.eventfd_write(backend.calls[1], 1)
    assert wait_for(lambda: function.msix.pending(1))
    set_control(function, CONTROL_ENABLE)
    assert calls_sent(backend) == 6 and lines[1].triggered == 1
    assert direct(backend, lines, 1)
    set_control(function, 0)                   # MSI-X off: INTx, which only pykvm raises
    assert calls_sent(backend) == 8
    os.eventfd_write(backend.calls[0], 1)
    assert wait_for(lambda: driver.read(0x1000, 1) == 1)      # ISR bit 0
    assert not lines[0].fired()


def test_reassigning_a_queue_s_vector_rewires_it(live):
    function, backend, lines, driver = live
    driver.write(0x16, 2, 1)                   # queue_select 1
    driver.write(0x1A, 2, NO_VECTOR)
    assert calls_sent(backend) == 3
    os.eventfd_write(backend.calls[1], 1)      # no vector: nothing to deliver, no irqfd
    assert not wait_for(lambda: lines[1].fired(), timeout=0.3)
    driver.write(0x1A, 2, 0)                   # shares queue 0's vector
    assert calls_sent(backend) == 4
    assert direct(backend, lines, 0)
    os.eventfd_write(backend.calls[1], 1)
    assert wait_for(lambda: lines[0].fired()) and lines[0].triggered == 0


def test_reset_and_a_new_driver_ok_wire_the_vectors_of_then(live):
    function, backend, lines, driver = live
    driver.write(0x14, 1, 0)                   # reset: the back end stops its rings
    assert backend.names()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]
    set_masked(function, 0, True)              # not started: nothing to swap
    assert calls_sent(backend) == 2
    assert driver.negotiate(VIRTIO_F_VERSION_1) & 8
    for index in range(2):
        driver.setup_queue(index, DriverRing(function.memory, 0x100000 + index * 0x10000, 128),
                           vector=index)
    driver.driver_ok()
    assert calls_sent(backend) == 4
    os.eventfd_write(backend.calls[0], 1)      # masked at hand-over: pykvm's eventfd
    assert wait_for(lambda: function.msix.pending(0))
    assert direct(backend, lines, 1)
    assert [m.request for m in backend.messages].count(Request.GET_VRING_BASE) == 2


# --- the snapshot refusal names the device ----------------------------------------------------
@pytest.mark.parametrize("kind", ["disk", "share"])
def test_a_snapshot_refusal_names_the_vhost_user_device_kind(tmp_path, kind):
    import struct

    from pykvm.devices.virtio.vhost_blk import VhostBlkDevice
    from pykvm.vhost_user.protocol import VhostUserError

    backend = FakeBackend(tmp_path / "b.sock", config=struct.pack("<Q", 2048).ljust(60, b"\0"))
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        frontend = Frontend.connect(str(tmp_path / "b.sock"), "vd")
        device = VhostBlkDevice(frontend, name="virtio-blk0") if kind == "disk" \
            else FsDevice(frontend, "t", name="virtio-fs0")
        lines = [RecordingLine(24 + i) for i in range(len(device.queue_sizes) + 1)]
        function = VirtioPciDevice(vm, memory, device, interrupt_lines=lines)
        try:
            with pytest.raises(VhostUserError) as refused:
                function.save_state()
        finally:
            function.close()
            vm.close()
            backend.close()
    message = str(refused.value)
    if kind == "disk":
        assert "virtio-blk0: a VM with a vhost-user disk" in message and "--share" not in message
    else:
        assert "virtio-fs0: a VM with a live share" in message and "--share DIR,copy" in message


# --- with real KVM: the interrupt reaches the vCPU's local APIC --------------------------------
def irr(vcpu, vector: int) -> bool:
    """Is ``vector`` requested in the vCPU's local APIC (IRR, 32 bits per 16 bytes)?"""
    regs = bytes(vcpu.get_lapic())
    word = int.from_bytes(regs[0x200 + vector // 32 * 0x10:][:4], "little")
    return bool(word >> vector % 32 & 1)


def test_with_kvm_the_back_end_s_signal_reaches_the_apic_and_a_masked_one_waits_for_unmask(
        kvm, tmp_path):
    from pykvm.vstate.vm import Vm

    backend = FakeBackend(tmp_path / "backend.sock")
    with GuestMemory.anonymous(16 << 20) as memory, Vm(kvm, memory) as vm:
        vm.create_vcpus(1)
        vcpu = vm.vcpus[0]
        regs = bytearray(vcpu.get_lapic())
        regs[0xF1] |= 1                                   # SVR: the APIC software-enabled
        vcpu.set_lapic(type(vcpu.get_lapic()).from_buffer_copy(regs))
        device = FsDevice(Frontend.connect(str(tmp_path / "backend.sock"), "virtio-fs0"), "t")
        function = VirtioPciDevice(vm, memory, device)
        try:
            driver = PciDriver(function)
            set_control(function, CONTROL_ENABLE)
            for vector, number in ((0, 0x41), (1, 0x42)):
                for offset, value in ((0, 0xFEE00000), (4, 0), (8, number), (12, 0)):
                    function.msix.write(16 * vector + offset, 4, value)
            assert driver.negotiate(VIRTIO_F_VERSION_1) & 8
            for index in range(2):
                driver.setup_queue(index, DriverRing(memory, 0x100000 + index * 0x10000, 128),
                                   vector=index)
            driver.driver_ok()
            os.eventfd_write(backend.calls[1], 1)        # the back end -> KVM -> the APIC
            assert wait_for(lambda: irr(vcpu, 0x42))
            assert function.msix.delivered == [0, 0, 0]   # no pykvm thread did it
            set_masked(function, 0, True)
            os.eventfd_write(backend.calls[0], 1)
            assert wait_for(lambda: function.msix.pending(0))
            assert not irr(vcpu, 0x41)                   # masked: held as the pending bit
            set_masked(function, 0, False)
            assert wait_for(lambda: irr(vcpu, 0x41))     # delivered at unmask
        finally:
            function.close()
    backend.close()
