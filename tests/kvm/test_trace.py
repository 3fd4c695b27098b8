"""--trace, --symbols and --stats: the exits a guest's source implies, exactly."""

import io
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykvm import layout
from pykvm.boot.modes import set_mode
from pykvm.bus import Device
from pykvm.errors import ConfigError
from pykvm.observe.kvmstats import KvmStats
from pykvm.observe.report import StatsPrinter, format_report
from pykvm.memory import GuestMemory
from pykvm.observe.symbols import Symbol, SymbolTable, load
from pykvm.observe.disasm import decode_io
from pykvm.observe.trace import Tracer
from pykvm.observe.trace_filter import TraceFilter
from pykvm.vstate.vm import Vm

from ..asm import assemble
from ..ports import ExitPort, SerialOut

ROOT = Path(__file__).resolve().parents[2]
BASE = layout.FLAT_LOAD_ADDR
MMIO = 0xD0000000

# Real mode: "Hi!\n" to COM1, one read of its line status, then exit 0.
# Each `out` sits at a fixed offset so the trace's addresses can be checked.
SERIAL_GUEST = """
    mov $0x3f8, %dx
    mov $0x48, %al
.org 0x10, 0x90
    out %al, %dx
    mov $0x69, %al
.org 0x20, 0x90
    out %al, %dx
    mov $0x21, %al
.org 0x30, 0x90
    out %al, %dx
    mov $0x0a, %al
.org 0x40, 0x90
    out %al, %dx
    add $5, %dx
.org 0x50, 0x90
    in %dx, %al
    xor %al, %al
.org 0x60, 0x90
    out %al, $0xf4
"""
SERIAL_EXITS = [("out", 0x3F8, 0x48, 0x10, "out dx, al"), ("out", 0x3F8, 0x69, 0x20, "out dx, al"),
                ("out", 0x3F8, 0x21, 0x30, "out dx, al"), ("out", 0x3F8, 0x0A, 0x40, "out dx, al"),
                ("in", 0x3FD, 0x60, 0x50, "in al, dx"), ("out", 0xF4, 0x00, 0x60, "out 0xf4, al")]

# Long mode: MMIO through a register and through an absolute address.
MMIO_GUEST = f"""
    mov ${MMIO:#x}, %rbx
    mov $0x11223344, %eax
.org 0x10, 0x90
    mov %eax, 8(%rbx)
.org 0x20, 0x90
    mov 12(%rbx), %ecx
.org 0x30, 0x90
    movabs %eax, {MMIO + 0x10:#x}
    xor %eax, %eax
.org 0x40, 0x90
    out %al, $0xf4
"""

LINE = re.compile(r"^\s*(?P<time>\d+\.\d+) cpu(?P<cpu>\d+) (?P<reason>\S+)\s+(?P<rest>.*)$")


class Window(Device):
    name = "window"

    def __init__(self):
        self.writes = []

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))

    def read(self, offset, size):
        return 0x5A5A5A5A


def run(kvm, code, mode, tracer=None, kernel_stats=False):
    with GuestMemory.anonymous(4 << 20) as memory, Vm(kvm, memory, tracer=tracer) as vm:
        serial, window = SerialOut(), Window()
        vm.add_pio_device(0x3F8, 8, serial)
        vm.add_pio_device(layout.EXIT_PORT, 1, ExitPort(vm))
        vm.add_mmio_device(MMIO, 0x1000, window)
        memory.write(BASE, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, mode, BASE)
        kernel = KvmStats(vm) if kernel_stats else None
        started = time.perf_counter_ns()
        stop = vm.run(timeout=20)
        elapsed = time.perf_counter_ns() - started
        assert stop is not None and stop.kind == "exit", stop
        snapshot = kernel.snapshot() if kernel else None
        return vm.vcpus[0].stats, serial, window, snapshot, elapsed


def traced(kvm, source, mode, origin, **options):
    out = io.StringIO()
    tracer = Tracer(out, **options)
    code = assemble(source, mode, origin)
    result = run(kvm, code, mode, tracer)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("# pykvm trace:")
    return lines[1:], result


# --- without KVM ------------------------------------------------------------------------------
def test_filter_syntax():
    f = TraceFilter.parse(["reason=io,mmio port=0x3f8-0x3ff", "addr=0xd0000000-0xd0000fff"])
    assert f.pio(0, 0x3F8, 1, "serial") and f.pio(0, 0x3FF, 0, None)
    assert not f.pio(0, 0xF4, 1, "exit")
    assert f.mmio(0, 0xD0000FFF, True, None) and not f.mmio(0, 0xD0001000, True, None)
    assert not f.other(0, "hlt")
    only_ports = TraceFilter.parse("port=0xf4")          # port= alone: port-I/O exits only
    assert only_ports.pio(0, 0xF4, 1, None) and not only_ports.mmio(0, MMIO, True, None)
    assert not only_ports.other(0, "internal_error")
    by_device = TraceFilter.parse("device=serial,none dir=out vcpu=1")
    assert by_device.pio(1, 0x3F8, 1, "serial") and by_device.mmio(1, MMIO, True, None)
    assert not by_device.pio(1, 0x3F8, 0, "serial") and not by_device.pio(0, 0x3F8, 1, "serial")
    assert TraceFilter.parse("reason=pio").reasons == {"io"}
    assert TraceFilter.parse(None).empty
    for bad, message in (("port", "KEY=VALUES"), ("port=0x3ff-0x3f8", "ends before"),
                         ("reason=bogus", "unknown exit reason"), ("colour=red", "unknown key"),
                         ("port=zz", "not a number"), ("dir=up", "in, out")):
        with pytest.raises(ConfigError, match=message):
            TraceFilter.parse(bad)


@pytest.mark.parametrize("code, bits, expected", [
    ("ee", 16, (1, 1, 1, None, False)),          # out dx, al
    ("ef", 16, (1, 1, 2, None, False)),          # out dx, ax
    ("ef", 32, (1, 1, 4, None, False)),          # out dx, eax
    ("66ef", 32, (2, 1, 2, None, False)),        # out dx, ax
    ("e6f4", 64, (2, 1, 1, 0xF4, False)),        # out 0xf4, al
    ("ec", 64, (1, 0, 1, None, False)),          # in al, dx
    ("e560", 32, (2, 0, 4, 0x60, False)),        # in eax, 0x60
    ("f36e", 64, (2, 1, 1, None, True)),         # rep outsb
    ("f3486f", 64, (3, 1, 4, None, True)),       # rep outsd (REX.W ignored)
])
def test_port_io_decoder(code, bits, expected):
    io_insn = decode_io(bytes.fromhex(code), bits)
    assert (io_insn.length, io_insn.direction, io_insn.size, io_insn.port, io_insn.string) \
        == expected
    assert decode_io(bytes.fromhex("90"), bits) is None


def test_system_map_symbols(tmp_path):
    path = tmp_path / "System.map"
    path.write_text("ffffffff81000000 T _stext\nffffffff81000000 T startup_64\n"
                    "ffffffff81000040 t secondary_startup_64\n0000000000000000 A abs_thing\n"
                    "ffffffff82000000 D some_data\n")
    table = load(path)
    assert table.format(0xFFFFFFFF81000010) in ("_stext+0x10", "startup_64+0x10")
    assert table.format(0xFFFFFFFF81000045) == "secondary_startup_64+0x5"
    assert table.format(0xFFFFFFFF82000000) == "some_data"
    assert table.format(0x1000) == ""
    path.write_text("not a map\n")
    with pytest.raises(ConfigError, match="System.map"):
        load(path)


@pytest.mark.parametrize("bits", [64, 32])
def test_elf_symbols(tmp_path, bits):
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld (binutils) are not installed")
    (tmp_path / "s.S").write_text("""
        .text
        .globl _start
        .type _start, @function
    _start: nop
        nop
        .size _start, 2
        .type helper, @function
    helper: ret
        .size helper, 1
    label:
        nop
        .set constant, 0x1234
    """)
    subprocess.run(["as", f"--{bits}", "-o", str(tmp_path / "s.o"), str(tmp_path / "s.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64" if bits == 64 else "elf_i386", "-Ttext=0x10000",
                    "-o", str(tmp_path / "s.elf"), str(tmp_path / "s.o")], check=True)
    table = load(tmp_path / "s.elf")
    assert table.format(0x10000) == "_start" and table.format(0x10001) == "_start+0x1"
    assert table.format(0x10002) == "helper"
    assert table.format(0x10003) == "label"
    assert table.address_of("constant") is None         # absolute: a constant, not a place


def test_symbols_of_a_missing_or_stripped_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nothing")
    (tmp_path / "empty.elf").write_bytes(b"\x7fELF\x02\x01" + bytes(58))   # no section headers
    with pytest.raises(ConfigError, match="section headers|truncated"):
        load(tmp_path / "empty.elf")


# --- with KVM -------------------------------------------------------------------------------------
def test_trace_shows_each_serial_exit_with_its_instruction(kvm):
    symbols = SymbolTable([Symbol(0, 0, "_start")])   # a real-mode guest is linked at 0
    lines, (stats, serial, _, _, _) = traced(kvm, SERIAL_GUEST, "real", 0, symbols=symbols)
    assert serial.data == b"Hi!\n"
    assert len(lines) == len(SERIAL_EXITS), "\n".join(lines)
    for line, (direction, port, value, offset, text) in zip(lines, SERIAL_EXITS):
        match = LINE.match(line)
        assert match and match["reason"] == "io" and match["cpu"] == "0", line
        rest = match["rest"]
        assert rest.startswith(f"{direction:<3} port={port:#x} size=1 value={value:#x}"), line
        assert f"dev={'exit' if port == 0xF4 else 'serial'}" in rest, line
        # the instruction that made the exit, wherever KVM left RIP
        assert re.search(rf"  {offset:#x} rip:(at|past) {re.escape(text)} <_start\+{offset:#x}>$",
                         rest), line
    assert "value=0x48 'H'" in lines[0] and "value=0xa '\\n'" in lines[3]
    # `in` still needs its value: RIP cannot have moved past it yet
    assert "rip:at in al, dx" in lines[4]
    times = [float(LINE.match(line)["time"]) for line in lines]
    assert times == sorted(times)


def test_trace_of_mmio_exits(kvm):
    lines, (_, _, window, _, _) = traced(kvm, MMIO_GUEST, "long", BASE)
    assert window.writes == [(8, 4, 0x11223344), (0x10, 4, 0x11223344)]
    mmio = [line for line in lines if " mmio " in line]
    assert len(mmio) == 3 and len(lines) == 4, "\n".join(lines)
    assert f"write addr={MMIO + 8:#x} size=4 value=0x11223344 dev=window" in mmio[0]
    assert mmio[0].endswith(f"{BASE + 0x10:#x} rip:past mov dword ptr [rbx + 8], eax")
    assert f"read addr={MMIO + 12:#x} size=4 value=0x5a5a5a5a dev=window" in mmio[1]
    assert mmio[1].endswith(f"{BASE + 0x20:#x} rip:at mov ecx, dword ptr [rbx + 0xc]")
    assert mmio[2].endswith(f"{BASE + 0x30:#x} rip:past movabs dword ptr [{MMIO + 0x10:#x}], eax")


def test_trace_filter_and_raw_bytes_without_capstone(kvm):
    lines, _ = traced(kvm, SERIAL_GUEST, "real", 0, use_capstone=False,
                      filter=TraceFilter.parse("port=0x3f8 dir=out"))
    assert len(lines) == 4
    assert all(re.search(r"0x[0-9a-f]+ rip:(at|past) ee$", line) for line in lines), lines


def test_stats_count_the_exits_the_guest_implies(kvm):
    code = assemble(SERIAL_GUEST, "real", 0)
    stats, _, _, kernel, elapsed = run(kvm, code, "real", kernel_stats=True)
    assert stats.exits_by_name() == {"io": 6}
    assert dict(stats.pio) == {(0x3F8, "out"): 4, (0x3FD, "in"): 1, (0xF4, "out"): 1}
    assert dict(stats.devices) == {"serial": 5, "exit": 1}
    report = format_report([stats], kernel=kernel)
    assert "vCPU 0: 6 exits to pykvm" in report
    if not kernel.available:
        assert "KVM (kernel) counters: unavailable" in report
        return
    counters = kernel.vcpus[0]
    # every exit pykvm saw is one KVM counted; KVM may count more (ones it kept)
    assert counters["exits"] >= 6
    assert re.search(rf"KVM \(kernel\): {counters['exits']} VM exits counted, 6 reached pykvm",
                     report), report
    assert "not separable from user space" in report


def test_time_split_sums_to_the_wall_time(kvm):
    # ~1000 exits: long enough that thread start-up is noise next to the run
    loop = "mov $0x3f8, %dx\n mov $1000, %cx\n1: out %al, %dx\n loop 1b\n xor %al, %al\n" \
           "out %al, $0xf4\n"
    stats, _, _, _, elapsed = run(kvm, assemble(loop, "real", 0), "real")
    assert stats.total_exits == 1001
    assert stats.guest_ns + stats.handler_ns + stats.other_ns == stats.wall_ns
    # The two measured parts (inside KVM_RUN, in pykvm's handlers) account for the
    # vCPU's wall time within 5 %: "other" (loop overhead, pauses) is the rest.
    measured = stats.guest_ns + stats.handler_ns
    assert 0.95 * stats.wall_ns <= measured <= stats.wall_ns, (measured, stats.wall_ns)
    # and the vCPU's wall time is the run's, less thread start-up and join (which wait
    # for the GIL while the vCPU thread is busy, and for a CPU on a loaded host)
    assert stats.wall_ns <= elapsed, (stats.wall_ns, elapsed)
    assert elapsed - stats.wall_ns <= 0.2 * elapsed + 50_000_000, (stats.wall_ns, elapsed)


def test_live_stats_are_printed_while_the_guest_runs(kvm):
    out = io.StringIO()
    with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        memory.write(BASE, assemble("spin: jmp spin\n", "real", 0))
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, "real", BASE)
        printer = StatsPrinter(vm, 0.1, KvmStats(vm), out, lambda: {"host kind": "test"})
        vm.start()
        printer.start()
        time.sleep(0.45)
        printer.stop()
        vm.request_stop("user", 0, "done")
        vm.wait(timeout=5)
    text = out.getvalue()
    assert printer.printed >= 2 and text.count("--- pykvm stats at ") == printer.printed
    assert "vCPU 0:" in text and "host kind: test" in text


# --- the command line -------------------------------------------------------------------------------
def tutorial(name: str) -> Path:
    binary = ROOT / "guests" / "tutorial" / "build" / f"{name}.bin"
    if not binary.exists():
        if shutil.which("make") is None:
            pytest.skip("make is not installed: cannot build the tutorial guests")
        subprocess.run(["make", "-C", str(ROOT / "guests" / "tutorial")], check=True,
                       capture_output=True)
    return binary


def test_cli_trace_symbols_and_stats_of_the_hello_tutorial(kvm, tmp_path):
    binary = tutorial("01-real-mode-hello")
    trace = tmp_path / "trace.txt"
    result = subprocess.run(
        [sys.executable, "-m", "pykvm", "run", "--flat", str(binary), "--entry", "real",
         f"--trace={trace}", "--symbols", str(binary.with_suffix(".elf")), "--stats"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    message = "Hello from real mode!\n"
    assert result.stdout == message
    lines = trace.read_text().splitlines()[1:]
    assert len(lines) == len(message) + 1
    for line, char in zip(lines, message):
        assert f"out port=0x3f8 size=1 value={ord(char):#x}" in line
        assert line.endswith("out dx, al <_start+0x10>"), line
    assert "port=0xf4" in lines[-1] and lines[-1].endswith("out 0xf4, al <_start+0x15>")
    assert f"vCPU 0: {len(message) + 1} exits to pykvm" in result.stderr
    assert re.search(rf"port 0x03f8 out +{len(message)}\n", result.stderr), result.stderr
    assert "KVM (kernel)" in result.stderr


def test_cli_rejects_bad_observing_options(tmp_path):
    binary = tmp_path / "g.bin"
    binary.write_bytes(b"\xf4")
    for options, fragment in ((["--trace-filter", "port=x"], "not a number"),
                              (["--stats-plot", str(tmp_path / "p.jpg")], ".svg or .png"),
                              (["--stats-interval", "0"], "positive"),
                              (["--trace", "--symbols", str(tmp_path / "none")], "cannot read"),
                              (["--trace", str(tmp_path / "no" / "t.txt")], "--trace"),
                              (["--trace-filter", "reason=bogus"], "unknown exit reason")):
        result = subprocess.run([sys.executable, "-m", "pykvm", "run", "--flat", str(binary),
                                 *options], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 2, result.stderr    # the user's mistake: exit status 2
        assert result.stderr.startswith("pykvm: error: ") and result.stderr.count("\n") == 1
        assert fragment in result.stderr, result.stderr
