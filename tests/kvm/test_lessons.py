"""The VMM lessons (guests/tutorial/vmm/*.py, guests/tutorial/c/): each run as the
tutorial README tells a reader to, one command each, with its output checked:
the exits it prints, the register and memory values, that the ioeventfd made no
exit to Python, that the interrupts arrived, that the C guest printed. Timings
the lessons print are never checked."""

import re
import subprocess
import sys

import pytest

from ..conftest import needs_kvm
from .test_tutorial import ROOT, TUTORIAL, built  # noqa: F401 (built: `make -C guests/tutorial`)

LESSONS = TUTORIAL / "vmm"

pytestmark = needs_kvm


def lesson(name: str) -> str:
    """`python3 guests/tutorial/vmm/NAME`: its stdout, after checking it succeeded."""
    done = subprocess.run([sys.executable, str(LESSONS / name)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_01_first_vmm_prints_each_ioctl_and_exit(built):
    out = lesson("01_first_vmm.py")
    assert "KVM_GET_API_VERSION -> 12\n" in out
    for step in ("KVM_CREATE_VM -> VM fd", "KVM_SET_USER_MEMORY_REGION: guest 0x1000+0x1000",
                 "KVM_CREATE_VCPU -> vCPU fd", "KVM_SET_SREGS, KVM_SET_REGS: rip=0x1000"):
        assert step in out, out
    # The guest computed 2 + 2 and printed it: two port exits, then the halt.
    assert re.findall(r"KVM_RUN -> (.*)", out) == [
        "KVM_EXIT_IO out port=0x3f8 data='4'",
        "KVM_EXIT_IO out port=0x3f8 data='\\n'",
        "KVM_EXIT_HLT"], out
    # The same guest through pykvm's classes: the same two bytes reach a bus device.
    assert out.count("Printer.write(port 0x3f8, '4')") == 1, out
    assert "stopped: guest halted with interrupts disabled" in out, out


def test_lessons_say_what_the_host_is(built):
    from pykvm.kvm import detect_host_kind

    first_line = lesson("02_after_the_stop.py").splitlines()[0]
    assert first_line.startswith(f"host: {detect_host_kind()}"), first_line


def test_02_registers_and_memory_after_the_stop(built):
    out = lesson("02_after_the_stop.py")
    assert "RAX = 42 " in out, out
    assert "guest memory at 0x400 = 5050 " in out, out


def test_flat_result_carries_registers_and_memory(vm):
    """The pytest plugin's FlatResult: vCPU 0's registers and guest RAM after the stop."""
    result = vm.run("movl $5050, 0x400\n"
                    "mov $0x1122334455667788, %rbx\n"
                    "mov $42, %eax\n"
                    "cli\n"
                    "hlt\n", mode="long", timeout=20)
    assert result.stop is not None and result.stop.kind == "halt", result.stop
    assert result.regs.rax == 42
    assert result.regs.rbx == 0x1122334455667788
    assert result.read_int(0x400, 4) == 5050
    assert result.memory[0x10000:0x10005] == b"\xc7\x04\x25\x00\x04"   # the guest's own code
    from pykvm.errors import GuestMemoryError
    with pytest.raises(GuestMemoryError):
        result.read_int(len(result.memory) - 2, 4)      # past the RAM kept: refused, not short


def test_03_mmio_exits_then_an_ioeventfd_without_exits(built):
    out = lesson("03_mmio_ioeventfd.py")
    # Run 1: each store is an exit carrying the address and the data (1000, 999, ...).
    assert "KVM_EXIT_MMIO write addr=0xd0000000 len=4 data=1000\n" in out, out
    assert "KVM_EXIT_MMIO write addr=0xd0000000 len=4 data=999\n" in out, out
    assert "1000 KVM_EXIT_MMIO exits reached pykvm, the device saw 1000 writes" in out, out
    # Run 2: the eventfd counted every ring and not one exit reached Python.
    assert "0 KVM_EXIT_MMIO exits reached pykvm, the eventfd counted 1000 rings" in out, out
    assert re.search(r"run 1 / run 2 = [\d.]+", out), out    # printed, never compared


def test_04_timer_then_irqfd_interrupts_arrive_in_hlt(built):
    out = lesson("04_interrupts.py")
    # In order: three ticks of KVM's in-kernel PIT, then three irqfd interrupts.
    assert re.findall(r"^(?:guest: waiting|timer tick|interrupt).*$", out, re.M) == [
        "guest: waiting in hlt for the timer (IRQ 0)",
        *(f"timer tick {n} (vector 0x20)" for n in (1, 2, 3)),
        "guest: waiting in hlt for the device (IRQ 5)",
        *(f"interrupt {n} arrived (vector 0x25)" for n in (1, 2, 3))], out
    assert "stopped: guest exited with status 0" in out, out
    # The PIT and PIC programming and the EOIs never reached pykvm: only COM1 and the
    # exit port did.
    ports = re.search(r"by port: (.*)", out).group(1)
    assert set(re.findall(r"(0x[0-9a-f]+):", ports)) == {"0x3f8", "0xf4"}, out


def test_05_your_device_is_used_by_the_guest(built):
    out = lesson("05_your_device.py")
    text = "hello from the guest, through your device\n"
    assert f"the guest printed: {text.upper()}" in out, out
    # One `out` and one `in` per byte, the newline included: each one exit to Upcase.
    assert f"called {2 * len(text)} times" in out, out
    assert "device: popped chain 0: b'hello, virtio'" in out, out
    assert "driver: used ring gave back chain 0, 13 bytes: b'HELLO, VIRTIO'" in out, out


def test_06_c_guest_prints_through_the_serial_port(built):
    done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--flat",
                           str(built / "c-hello.bin"), "--entry", "long", "--stats"],
                          capture_output=True, timeout=60, cwd=ROOT)
    assert done.stdout == b"Hello from C!\nfibonacci(50) = 12586269025\n", done.stderr
    assert done.returncode == 0, done.stderr
    # Each character: one poll of the line status register, one `out`.
    stats = done.stderr.decode()
    assert re.search(r"port 0x03f8 out\s+42\b", stats), stats
    assert re.search(r"port 0x03fd in\s+42\b", stats), stats


@pytest.mark.linux
def test_07_linux_view_stats_and_plot(tmp_path):
    """Lesson 7's command on the default guest: the command's output, the report's
    three places (KVM, pykvm, completions on kvm_pvm) and the plot file."""
    pytest.importorskip("matplotlib")
    from pykvm.kvm import detect_host_kind

    plot = tmp_path / "stats.png"
    done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--stats", "--stats-plot",
                           str(plot), "--", "ls", "/"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"bin", "proc", "sys"} <= set(done.stdout.split()), done.stdout
    report = done.stderr
    assert re.search(r"vCPU 0: \d+ exits to pykvm", report), report
    assert re.search(r"device serial\s+\d+", report), report
    assert re.search(r"KVM \(kernel\): \d+ VM exits counted", report), report
    if detect_host_kind() == "kvm_pvm":
        assert re.search(r"completed by pykvm: syscall\s+\d+", report), report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lessons_stop_with_one_line_without_kvm(monkeypatch):
    """A reader without a usable /dev/kvm gets one line, not a traceback."""
    from pykvm.errors import KvmUnavailable

    monkeypatch.syspath_prepend(str(LESSONS))
    import lesson as lesson_module

    def unusable(*args):
        raise KvmUnavailable("/dev/kvm: no such device")

    monkeypatch.setattr(lesson_module, "Kvm", unusable)
    with pytest.raises(SystemExit) as stopped:
        lesson_module.host_note()
    assert str(stopped.value) == "cannot run this lesson: /dev/kvm: no such device"
