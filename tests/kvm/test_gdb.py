"""The GDB stub: the remote protocol with a small client of our own (exact and
fast), and Debian's gdb itself against a tutorial guest."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from pykvm import layout, sandbox
from pykvm.boot.modes import set_mode
from pykvm.errors import ConfigError, GdbProtocolError
from pykvm.gdb.listen import GdbAddress
from pykvm.gdb.protocol import MAX_RETRIES, PACKET_SIZE, Connection, escape, frame, unescape
from pykvm.gdb.registers import REGISTERS, target_xml
from pykvm.gdb.stub import GdbStub
from pykvm.memory import GuestMemory
from pykvm.vstate.vm import Vm

from ..asm import assemble
from ..conftest import on_pvm
from ..ports import ExitPort, SerialOut

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "guests" / "tutorial"
BASE = layout.FLAT_LOAD_ADDR

# A 32-bit ring-0 guest with its instructions at fixed addresses.
GUEST = """
    mov $0x3f8, %dx
    mov $0x41, %al
    xor %ecx, %ecx
.org 0x10, 0x90
    out %al, %dx            # 0x10: 'A' (an exit to pykvm)
    inc %ecx                # 0x11
    inc %ecx                # 0x12
.org 0x20, 0x90
    inc %ecx                # 0x20
    mov $0x42, %al          # 0x21
    out %al, %dx            # 0x23: 'B'
    xor %eax, %eax
    out %al, $0xf4          # exit 0
"""
OUT_A, INC1, INC3 = BASE + 0x10, BASE + 0x11, BASE + 0x20
SPIN = "spin: jmp spin\n"
PVM_RING3 = ("kvm_pvm does not report single-step or hardware-breakpoint traps for guest "
             "ring 3, and int3 there goes straight to the guest's IDT (measured; docs/hosts.md)")


OFFSETS = {}
_at = 0
for _reg in REGISTERS:
    OFFSETS[_reg.name] = (_at, _reg.bits // 8)
    _at += _reg.bits // 8


def register(g_reply: str, name: str) -> int:
    at, size = OFFSETS[name]
    return int.from_bytes(bytes.fromhex(g_reply)[at:at + size], "little")


class Rsp:
    """Just enough of gdb's side of the protocol."""

    def __init__(self, address: GdbAddress):
        if address.tcp:
            self.sock = socket.create_connection((address.host, address.port), timeout=15)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(15)
            self.sock.connect(address.path)
        self.buffer = b""
        self.ack = True

    def _byte(self) -> bytes:
        while not self.buffer:
            data = self.sock.recv(4096)
            assert data, "the stub closed the connection"
            self.buffer += data
        byte, self.buffer = self.buffer[:1], self.buffer[1:]
        return byte

    def send(self, payload: str) -> None:
        data = payload.encode("latin-1")
        self.sock.sendall(b"$" + data + b"#%02x" % (sum(data) & 0xFF))
        if self.ack:
            assert self._byte() == b"+"

    def recv(self) -> str:
        while self._byte() != b"$":
            pass
        data = b""
        while (byte := self._byte()) != b"#":
            data += byte
        checksum = self._byte() + self._byte()
        assert int(checksum, 16) == sum(data) & 0xFF
        if self.ack:
            self.sock.sendall(b"+")
        return unescape(data).decode("latin-1")

    def ask(self, payload: str) -> str:
        self.send(payload)
        return self.recv()

    def handshake(self) -> str:
        features = self.ask("qSupported:swbreak+;hwbreak+")
        assert self.ask("QStartNoAckMode") == "OK"
        self.ack = False
        return features

    def regs(self) -> str:
        return self.ask("g")

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def debugged(kvm, code: bytes, mode: str = "protected", prepare=None, where=None):
    """A VM running ``code`` under the stub, and a connected client. ``where``: the
    stub's address (default: a Unix socket, as `pykvm run --gdb PATH`)."""
    with GuestMemory.anonymous(4 << 20) as memory, Vm(kvm, memory) as vm, \
            tempfile.TemporaryDirectory() as directory:
        serial = SerialOut()
        vm.add_pio_device(0x3F8, 8, serial)
        vm.add_pio_device(layout.EXIT_PORT, 1, ExitPort(vm))
        memory.write(BASE, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, mode, BASE)
        if prepare:
            prepare(memory)
        stub = GdbStub(vm, os.path.join(directory, "gdb.sock") if where is None else where)
        stub.attach()
        vm.start()
        client = Rsp(stub.address)
        try:
            yield vm, stub, client, serial
        finally:
            client.close()
            vm.request_stop("user", 0, "test done")
            stub.close()
            vm.wait(timeout=10)


# --- without KVM ---------------------------------------------------------------------------------
def test_target_description_is_gdbs_amd64_layout():
    root = ElementTree.fromstring(target_xml())
    assert root.find("architecture").text == "i386:x86-64"
    names = [reg.get("name") for reg in root.iter("reg")]
    assert names[:26] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                          *[f"r{i}" for i in range(8, 16)], "rip", "eflags",
                          "cs", "ss", "ds", "es", "fs", "gs", "st0", "st1"]
    assert [int(reg.get("regnum")) for reg in root.iter("reg")] == list(range(len(names)))
    assert "mxcsr" in names and "cr3" in names
    assert OFFSETS["rip"] == (128, 8) and OFFSETS["eflags"] == (136, 4)


def test_packet_escaping_round_trips():
    data = bytes(range(256))
    escaped = escape(data)
    assert b"#" not in escaped and b"$" not in escaped
    assert unescape(escaped) == data


def test_an_oversized_packet_ends_the_connection_without_growing_a_buffer():
    """The peer is untrusted: a packet longer than the PacketSize announced is refused."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        conn = Connection(ours)
        theirs.sendall(frame("g"))
        assert conn.read_packet() == "g" and theirs.recv(1) == b"+"
        theirs.sendall(b"$" + b"0" * (PACKET_SIZE + 1) + b"#30")
        with pytest.raises(GdbProtocolError, match="over"):
            conn.read_packet()
        assert len(conn._buffer) < PACKET_SIZE       # what was read stays unread, not kept


def test_bad_checksums_are_refused_then_the_connection_dropped():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        conn = Connection(ours)
        theirs.sendall(b"$g#zz" + frame("?"))        # not hex: a bad checksum, not a crash
        assert conn.read_packet() == "?" and theirs.recv(2) == b"-+"
        theirs.sendall(b"$g#00" * MAX_RETRIES)
        with pytest.raises(GdbProtocolError, match="checksum"):
            conn.read_packet()
        conn.no_ack = True
        conn.send("OK")
        assert theirs.recv(64) == b"-" * MAX_RETRIES + frame("OK")


def test_the_gdb_package_imports_one_way():
    """No cycle inside pykvm/gdb; the package itself loads nothing (--gdb parses without
    the stub); nothing the VM is built from imports gdb (no cost without a debugger)."""
    from ..import_graph import ROOT, find_cycle, graph, reachable

    edges = graph((ROOT / "gdb").glob("*.py"))
    assert {"pykvm.gdb.stub", "pykvm.gdb.protocol", "pykvm.gdb.traps"} <= set(edges)
    assert find_cycle(edges) is None
    assert edges["pykvm.gdb"] == set()
    assert "pykvm.gdb.stub" not in reachable(edges, "pykvm.gdb.traps")
    everything = graph(ROOT.rglob("*.py"))
    gdb = [m for m in everything if m.startswith("pykvm.gdb")]
    assert [m for m in gdb if m in reachable(everything, m)] == []
    assert not any(m.startswith("pykvm.gdb") for m in reachable(everything, "pykvm.vstate.vm"))
    for path in (ROOT / "gdb").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path


def test_gdb_addresses_are_unix_sockets_unless_tcp_is_asked_for():
    assert GdbAddress.parse("/run/g.sock") == GdbAddress(path="/run/g.sock")
    assert GdbAddress.parse("tcp:1234") == GdbAddress(host="127.0.0.1", port=1234)
    assert GdbAddress.parse("127.0.0.1:1234").gdb_target() == ":1234"
    assert GdbAddress.parse("[::1]:1234") == GdbAddress(host="::1", port=1234)
    for bad in ("1234", "tcp:0", "tcp:65536", "tcp:x", ""):
        with pytest.raises(ConfigError, match="--gdb"):
            GdbAddress.parse(bad)


# --- with KVM, our own client --------------------------------------------------------------------
def test_the_stub_serves_a_private_unix_socket_by_default(kvm):
    code = assemble(GUEST, "protected", BASE)
    with debugged(kvm, code) as (vm, stub, gdb, serial):
        assert not stub.address.tcp and stub.port is None
        assert os.stat(stub.address.path).st_mode & 0o777 == 0o600
        gdb.handshake()
        assert gdb.ask("?").startswith("T05")
        # the stub's thread took the sandbox's "control" role (pykvm/sandbox)
        assert sandbox.thread_filters(stub.thread.native_id) == (1 if sandbox.enabled() else 0)
    assert not os.path.exists(stub.address.path)       # removed at close


def test_tcp_is_served_when_asked_for(kvm):
    code = assemble(GUEST, "protected", BASE)
    with debugged(kvm, code, where=0) as (vm, stub, gdb, serial):
        assert stub.address.tcp and stub.address.host == "127.0.0.1" and stub.port > 0
        gdb.handshake()
        assert gdb.ask("?").startswith("T05")


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a client as another uid")
def test_another_user_cannot_take_the_stub_over(kvm):
    """Even through a socket file that lets it in: SO_PEERCRED is checked; the guest
    stays paused and the stub still serves its own user."""
    from .test_control_socket import NOBODY, exchange_as_user

    code = assemble(GUEST, "protected", BASE)
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        sock = os.path.join(directory, "gdb.sock")
        with debugged(kvm, code, where=sock) as (vm, stub, gdb, serial):
            os.chmod(sock, 0o666)
            assert exchange_as_user(NOBODY, NOBODY, sock, b"$c#63") == b""   # hung up on
            assert serial.data == b""                 # the continue never ran
            gdb.handshake()
            assert gdb.ask("?").startswith("T05")


def test_malformed_packets_get_errors_and_the_session_goes_on(kvm):
    code = assemble(GUEST, "protected", BASE)
    with debugged(kvm, code) as (vm, stub, gdb, serial):
        gdb.handshake()
        for packet in ("Hgzz", "Hg7", "mzz,1", "m0", "Mzz", "Z0,", "pzz", "P0=zz", "czz",
                       "qThreadExtraInfo,x", "qXfer:features:read:target.xml:zz"):
            assert gdb.ask(packet) == "E01", packet
        assert gdb.ask("p99999") == "E01" and gdb.ask("Z2,0,1") == ""
        window = gdb.ask("qXfer:features:read:target.xml:0,ffffffff")
        document = target_xml()
        assert window == ("m" if len(document) > PACKET_SIZE // 2 else "l") + \
            document[:PACKET_SIZE // 2]
        assert serial.data == b"" and gdb.ask("?").startswith("T05")   # nothing ran


def test_starts_paused_and_reads_state(kvm):
    code = assemble(GUEST, "protected", BASE)
    with debugged(kvm, code) as (vm, stub, gdb, serial):
        assert "swbreak+" in gdb.handshake()
        time.sleep(0.2)
        assert serial.data == b""                     # not one guest instruction ran
        assert gdb.ask("?").startswith("T05thread:1;")
        assert gdb.ask("qfThreadInfo") == "m1"
        regs = gdb.regs()
        assert register(regs, "rip") == BASE
        assert register(regs, "cs") == 0x08
        assert register(regs, "cr0") & 1                # protected mode
        assert bytes.fromhex(gdb.ask(f"m{BASE:x},8")) == code[:8]
        assert gdb.ask("qXfer:features:read:target.xml:0,40").startswith("m<?xml")
        extra = bytes.fromhex(gdb.ask("qThreadExtraInfo,1")).decode()
        assert extra == "vCPU 0, protected mode, CPL 0"


def test_breakpoint_step_registers_memory_continue(kvm):
    code = assemble(GUEST, "protected", BASE)
    with debugged(kvm, code) as (vm, stub, gdb, serial):
        gdb.handshake()
        assert gdb.ask(f"Z0,{OUT_A:x},1") == "OK"
        assert vm.memory.read_u8(OUT_A) == 0xCC         # int3 in guest memory...
        assert bytes.fromhex(gdb.ask(f"m{OUT_A:x},1")) == b"\xee"   # ...hidden from gdb
        reply = gdb.ask("c")
        assert reply.startswith("T05") and "swbreak" in reply
        assert register(gdb.regs(), "rip") == OUT_A
        assert serial.data == b""                     # stopped before the out
        assert gdb.ask(f"z0,{OUT_A:x},1") == "OK"
        assert vm.memory.read_u8(OUT_A) == 0xEE

        # Step over the `out`: KVM drops the step trap of an instruction that exits
        # to user space; the stub must still stop right after it, exactly once.
        assert gdb.ask("s").startswith("T05")
        regs = gdb.regs()
        assert register(regs, "rip") == INC1
        assert serial.data == b"A"
        assert gdb.ask("s").startswith("T05")
        regs = gdb.regs()
        assert register(regs, "rip") == INC1 + 1 and register(regs, "rcx") == 1

        # Write a register and memory.
        assert gdb.ask(f"P{2:x}=" + (0x1234).to_bytes(8, "little").hex()) == "OK"  # rcx
        assert gdb.ask("p2") == (0x1234).to_bytes(8, "little").hex()
        assert gdb.ask("M30000,4:deadbeef") == "OK"
        assert vm.memory.read(0x30000, 4) == bytes.fromhex("deadbeef")

        # A hardware breakpoint, then run to the end.
        assert gdb.ask(f"Z1,{INC3:x},1") == "OK"
        reply = gdb.ask("c")
        assert reply.startswith("T05") and "hwbreak" in reply
        regs = gdb.regs()
        assert register(regs, "rip") == INC3 and register(regs, "rcx") == 0x1235
        assert gdb.ask(f"z1,{INC3:x},1") == "OK"
        assert gdb.ask("c") == "W00"
        assert serial.data == b"AB"


def test_int3_breakpoint_without_a_debug_register(kvm):
    """All four debug registers taken: the int3 alone must stop the guest (on kvm_pvm
    through the emulation failure it causes, elsewhere as a #BP debug exit)."""
    code = assemble(GUEST, "protected", BASE)
    with debugged(kvm, code) as (vm, stub, gdb, serial):
        gdb.handshake()
        for i in range(4):
            assert gdb.ask(f"Z1,{0x30000 + 16 * i:x},1") == "OK"
        assert gdb.ask(f"Z1,{0x30100:x},1") == "E1c"   # no fifth one
        assert gdb.ask(f"Z0,{INC3:x},1") == "OK"
        assert all(bp.slot is None for bp in stub.breakpoints.soft.values())
        reply = gdb.ask("c")
        assert reply.startswith("T05") and "swbreak" in reply
        assert register(gdb.regs(), "rip") == INC3
        assert serial.data == b"A"
        assert gdb.ask(f"z0,{INC3:x},1") == "OK"
        assert gdb.ask("c") == "W00"
        assert serial.data == b"AB"


def test_ctrl_c_interrupts_a_running_guest_and_kill_stops_it(kvm):
    code = assemble(SPIN, "protected", BASE)
    with debugged(kvm, code) as (vm, stub, gdb, serial):
        gdb.handshake()
        gdb.send("c")
        time.sleep(0.3)
        gdb.sock.sendall(b"\x03")
        assert gdb.recv().startswith("T02")
        assert register(gdb.regs(), "rip") == BASE
        gdb.send("k")
        assert vm.wait(timeout=5) is not None
        assert vm.stop_reason.message == "killed from gdb"


# A long-mode guest that drops to ring 3 and spins there.
RING3 = """
    lgdt gdtr(%rip)
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    push $0x1b
    push $0x30000
    push $0x2
    push $0x23
    lea user(%rip), %rax
    push %rax
    iretq
.align 8
gdt: .quad 0, 0x00af9b000000ffff, 0x00cf93000000ffff, 0x00cff3000000ffff, 0x00affb000000ffff
gdtr: .word 39
    .quad gdt
.org 0x60, 0x90
user:
    nop
    nop
    jmp user
"""
USER = BASE + 0x60


def user_pages(memory):
    """Let ring 3 use the identity map set_mode built (2 MiB pages below 1 GiB)."""
    memory.write_u64(layout.PML4_ADDR, memory.read_u64(layout.PML4_ADDR) | 4)
    memory.write_u64(layout.PDPT_ADDR, memory.read_u64(layout.PDPT_ADDR) | 4)
    for i in range(512):
        entry = layout.PD_ADDR + 8 * i
        memory.write_u64(entry, memory.read_u64(entry) | 4)


def test_ctrl_c_stops_ring3_code(kvm):
    code = assemble(RING3, "long", BASE)
    with debugged(kvm, code, "long", user_pages) as (vm, stub, gdb, serial):
        gdb.handshake()
        gdb.send("c")
        time.sleep(0.3)
        gdb.sock.sendall(b"\x03")
        assert gdb.recv().startswith("T02")
        regs = gdb.regs()
        assert USER <= register(regs, "rip") <= USER + 3
        assert register(regs, "cs") == 0x23               # ring 3
        extra = bytes.fromhex(gdb.ask("qThreadExtraInfo,1")).decode()
        assert extra.endswith("long mode, CPL 3")


def test_hardware_breakpoint_and_step_in_ring3(kvm):
    if on_pvm():
        pytest.skip(PVM_RING3)
    code = assemble(RING3, "long", BASE)
    with debugged(kvm, code, "long", user_pages) as (vm, stub, gdb, serial):
        gdb.handshake()
        assert gdb.ask(f"Z1,{USER + 1:x},1") == "OK"
        assert "hwbreak" in gdb.ask("c")
        assert register(gdb.regs(), "rip") == USER + 1
        assert gdb.ask(f"z1,{USER + 1:x},1") == "OK"
        assert gdb.ask("s").startswith("T05")
        assert register(gdb.regs(), "rip") == USER + 2


# --- Debian's gdb against a tutorial guest ------------------------------------------------------
def tutorial(name: str) -> Path:
    binary = TUTORIAL / "build" / f"{name}.bin"
    if not binary.exists():
        if shutil.which("make") is None:
            pytest.skip("make is not installed: cannot build the tutorial guests")
        subprocess.run(["make", "-C", str(TUTORIAL)], check=True, capture_output=True)
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gdb_over_tcp_is_explicit_and_warned_about(kvm, tmp_path):
    flat = tmp_path / "hlt.bin"
    flat.write_bytes(b"\xf4")
    port = free_port()
    vm = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--flat", str(flat),
                           "--gdb", f"tcp:{port}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        warning, waiting = vm.stderr.readline(), vm.stderr.readline()
    finally:
        vm.kill()
        vm.wait()
    assert warning.startswith(f"pykvm: warning: the gdb stub on TCP 127.0.0.1:{port} has no "
                              "authentication"), warning
    assert f"waits for gdb on 127.0.0.1:{port} (gdb -ex 'target remote :{port}')" in waiting


def test_gdb_batch_against_the_real_mode_tutorial(kvm):
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed (the Makefile's apt list has it)")
    binary = tutorial("01-real-mode-hello")
    elf = binary.with_suffix(".elf")
    directory = tempfile.mkdtemp()
    sock = os.path.join(directory, "gdb.sock")
    vm = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--flat", str(binary),
                           "--entry", "real", "--gdb", sock], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        waiting = vm.stderr.readline()           # the stub listens once this is printed
        assert f"waits for gdb on {sock} (gdb -ex 'target remote {sock}')" in waiting, \
            waiting + vm.stderr.read()
        # The message loop's `out %al, %dx` is at _start+0x10 (see build/*.lst).
        result = subprocess.run(
            ["gdb", "-batch", "-nx", str(elf), "-ex", f"target remote {sock}",
             "-ex", "break *_start+0x10", "-ex", "continue", "-ex", "p/x $rax",
             "-ex", "p/x $rip", "-ex", "stepi", "-ex", "p/x $rip", "-ex", "delete",
             "-ex", "continue"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/tmp"})
        out = vm.communicate(timeout=30)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        shutil.rmtree(directory)
    text = result.stdout + result.stderr
    assert "Breakpoint 1, 0x0000000000000010 in _start ()" in text, text
    assert "$1 = 0x1048" in text, text            # AL = 'H': the first byte it will send
    assert "$2 = 0x10" in text and "$3 = 0x11" in text, text   # one stepi: past the out
    assert "exited normally" in text, text
    assert out[0] == "Hello from real mode!\n"
    assert vm.returncode == 0
