"""The core with real KVM: VM set-up, the run loop's exit dispatch, stops, pauses."""

import threading
import time
from contextlib import contextmanager

import pytest

from pykvm import layout
from pykvm.bus import Device, PioBus
from pykvm.boot.modes import set_mode
from pykvm.errors import ConfigError, GuestMemoryError, KvmUnavailable
from pykvm.kvm import Kvm
from pykvm.memory import GuestMemory
from pykvm.vstate.vm import State, Vm

from ..asm import assemble
from ..ports import ExitPort

EXIT = f"mov ${layout.EXIT_PORT:#x}, %dx\n out %al, %dx\n"


class Recorder(Device):
    """Records every access; reads answer a fixed pattern."""

    name = "recorder"

    def __init__(self, read_value=0x5A):
        self.writes, self.reads, self.read_value = [], [], read_value

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))

    def read(self, offset, size):
        self.reads.append((offset, size))
        return self.read_value + offset


@contextmanager
def flat_vm(kvm, code: bytes, mode="long", devices=(), mmio=(), mem=2 << 20):
    """A VM with ``code`` loaded at FLAT_LOAD_ADDR, one vCPU set up in ``mode``, and
    pykvm's exit port wired; not started."""
    with GuestMemory.anonymous(mem) as memory, Vm(kvm, memory) as vm:
        vm.add_pio_device(layout.EXIT_PORT, 1, ExitPort(vm))
        for base, length, device in devices:
            vm.add_pio_device(base, length, device)
        for base, length, device in mmio:
            vm.add_mmio_device(base, length, device)
        memory.write(layout.FLAT_LOAD_ADDR, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, mode, layout.FLAT_LOAD_ADDR)
        yield vm


def run_guest(kvm, code: bytes, mode="real", devices=(), mmio=(), timeout=20):
    with flat_vm(kvm, code, mode, devices, mmio) as vm:
        stop = vm.run(timeout=timeout)
        return stop, vm.vcpus[0].stats


def test_host_kind_and_capabilities(kvm):
    assert kvm.api_version == 12
    assert kvm.host_kind in ("kvm_pvm", "kvm_intel", "kvm_amd")
    caps = kvm.capabilities()
    assert caps["IRQCHIP"] and caps["USER_MEMORY"]
    assert any(e.function == 1 for e in kvm.supported_cpuid())
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC is always saved/restored


def test_missing_device_is_one_clear_error(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))
    (tmp_path / "locked").write_text("")
    (tmp_path / "locked").chmod(0)
    import os
    if os.geteuid() != 0:
        with pytest.raises(KvmUnavailable, match="no permission"):
            Kvm(str(tmp_path / "locked"))


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_port_writes_and_reads_reach_the_device_in_every_mode(kvm, mode):
    recorder = Recorder()
    code = assemble(f"""
        mov $0x3f8, %dx
        mov $0x41, %al
        out %al, %dx
        mov $0x1234, %ax
        out %ax, %dx
        mov $0x3f9, %dx
        in %dx, %al
        mov $0x3f8, %dx
        out %al, %dx
        mov $0x2a, %al
        {EXIT}""", mode, origin=0 if mode == "real" else layout.FLAT_LOAD_ADDR)
    stop, stats = run_guest(kvm, code, mode, devices=[(0x3F8, 2, recorder)])
    assert (stop.kind, stop.status) == ("exit", 42)
    assert recorder.writes == [(0, 1, 0x41), (0, 2, 0x1234), (0, 1, 0x5B)]
    assert recorder.reads == [(1, 1)]
    assert stats.exits_by_name()["io"] == 5
    assert stats.pio[(0x3F8, "out")] == 3 and stats.pio[(0x3F9, "in")] == 1


def test_string_io_delivers_every_element(kvm):
    recorder = Recorder()
    code = assemble(f"""
        mov $0x1000, %ax
        mov %ax, %ds
        mov %ax, %es
        mov $msg, %si
        mov $5, %cx
        mov $0x3f8, %dx
        cld
        rep outsb
        mov $buf, %di
        mov $3, %cx
        rep insb
        mov buf+2, %al
        {EXIT}
    msg: .ascii "hello"
    buf: .byte 0, 0, 0""")
    stop, _ = run_guest(kvm, code, devices=[(0x3F8, 1, recorder)])
    assert [v for _, _, v in recorder.writes] == list(b"hello")
    assert len(recorder.reads) == 3
    assert stop.status == 0x5A


def test_unknown_ports_read_all_ones_and_are_counted(kvm):
    code = assemble(f"""
        mov $0x1234, %dx
        in %dx, %al
        out %al, %dx
        {EXIT}""")
    stop, stats = run_guest(kvm, code)
    assert stop.status == 0xFF
    assert stats.unhandled_pio == 2


def test_mmio_reads_and_writes_dispatch_by_address(kvm):
    recorder = Recorder(read_value=0x11223344)
    base = 0xD0000000
    code = assemble(f"""
        mov ${base:#x}, %rbx
        movl $0xcafef00d, 0x10(%rbx)
        movq 0x8(%rbx), %rax
        movq %rax, 0x20(%rbx)
        movl 0x1000(%rbx), %eax
        {EXIT}""", "long", origin=layout.FLAT_LOAD_ADDR)
    stop, stats = run_guest(kvm, code, "long", mmio=[(base, 0x1000, recorder)])
    assert recorder.writes == [(0x10, 4, 0xCAFEF00D), (0x20, 8, 0x11223344 + 8)]
    assert recorder.reads == [(0x8, 8)]
    assert stop.status == 0xFF      # the unmapped read gave all-ones
    assert stats.unhandled_mmio == 1
    assert stats.exits_by_name()["mmio"] == 4


def test_triple_fault_stops_with_registers(kvm):
    # No IDT: the #UD from ud2 cannot be delivered -> #DF -> triple fault.
    code = assemble("ud2", "protected", origin=layout.FLAT_LOAD_ADDR)
    stop, _ = run_guest(kvm, code, "protected")
    assert stop.kind == "crash"
    assert "triple fault" in stop.message and "rip=" in stop.message


def test_halt_with_interrupts_off_ends_the_vm(kvm):
    stop, _ = run_guest(kvm, assemble("cli\nhlt"))
    assert stop.kind == "halt"


def test_pause_stops_progress_and_resume_continues(kvm):
    counter = Recorder()
    code = assemble("""
        xor %eax, %eax
    1:  inc %eax
        mov $0x80, %dx
        out %eax, %dx
        jmp 1b""", "long", origin=layout.FLAT_LOAD_ADDR)
    with flat_vm(kvm, code, devices=[(0x80, 4, counter)]) as vm:
        start_run_pause(vm)
        frozen = len(counter.writes)
        time.sleep(0.3)
        assert len(counter.writes) == frozen and frozen > 0
        resume_run(vm)
        assert len(counter.writes) > frozen
        stop_and_join(vm)


def start_run_pause(vm) -> None:
    """Start a created VM, let it run 0.3 s, pause it; the states follow the life cycle."""
    assert vm.state is State.CREATED
    vm.start()
    assert vm.state is State.RUNNING
    time.sleep(0.3)
    vm.pause()
    assert vm.state is State.PAUSED


def resume_run(vm) -> None:
    """Resume a paused VM and let it run 0.3 s."""
    vm.resume()
    assert vm.state is State.RUNNING
    time.sleep(0.3)


def stop_and_join(vm) -> None:
    """Stop a running VM: it reports the user's stop, and every vCPU thread has ended."""
    vm.request_stop("user", 0, "test done")
    assert vm.wait(timeout=5).kind == "user"
    assert vm.state is State.STOPPED
    assert not any(v.thread.is_alive() for v in vm.vcpus)


def test_stop_from_another_thread_kicks_a_spinning_guest(kvm):
    code = assemble("1: jmp 1b", "long", origin=layout.FLAT_LOAD_ADDR)
    with flat_vm(kvm, code) as vm:
        vm.start()
        threading.Timer(0.2, vm.request_stop, ("user", 5, "stopped")).start()
        stop = vm.wait(timeout=10)
        assert (stop.kind, stop.status) == ("user", 5)


def test_vcpu_call_runs_on_the_vcpu_thread(kvm):
    code = assemble("1: jmp 1b", "long", origin=layout.FLAT_LOAD_ADDR)
    with flat_vm(kvm, code) as vm:
        vm.start()
        name = vm.vcpus[0].call(lambda vcpu: threading.current_thread().name)
        rip = vm.vcpus[0].call(lambda vcpu: vcpu.get_regs().rip)
        vm.request_stop("user", 0, "done")
        vm.wait(timeout=5)
    assert name == "vcpu0"
    assert layout.FLAT_LOAD_ADDR <= rip < layout.FLAT_LOAD_ADDR + len(code)


def test_guest_memory_is_bounds_checked():
    with GuestMemory.anonymous(1 << 20) as memory:
        memory.write_u64(0xFFFF8, 0x1122334455667788)
        assert memory.read_u64(0xFFFF8) == 0x1122334455667788
        for gpa, length in [(0xFFFF9, 8), (-1, 1), (1 << 20, 1), (0, (1 << 20) + 1)]:
            with pytest.raises(GuestMemoryError):
                memory.read(gpa, length)
    with pytest.raises(GuestMemoryError):
        GuestMemory.anonymous(4095)


def test_ram_above_the_pci_hole_moves_above_4g():
    assert layout.ram_ranges(512 << 20) == [(0, 512 << 20)]
    assert layout.ram_ranges(8 << 30) == [(0, 3 << 30), (4 << 30, 5 << 30)]


def test_bus_rejects_overlaps_and_finds_by_address():
    bus = PioBus()
    first = Recorder()
    bus.register(0x3F8, 8, first)
    with pytest.raises(ConfigError, match="overlaps"):
        bus.register(0x3FF, 2, Recorder())
    assert bus.find(0x3FC).device is first and bus.find(0x400) is None
    assert bus.ports[0x3FA] == (first, 2)
    bus.unregister(0x3F8)
    assert bus.find(0x3FC) is None and 0x3FA not in bus.ports
