"""What kvm_pvm cannot do and pykvm completes (pykvm/quirks), tested two ways:

- tiny guests from tests/guests/*.S, assembled at test time with GNU as and
  `ld --oformat binary`, run on this machine's KVM. They must work on every kind
  of host; on kvm_pvm the completion counters must show that pykvm did the work,
  elsewhere (VT-x/AMD-V) there must be no completion at all;
- the system-call completion against a fake vCPU over a GuestMemory, no KVM needed.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykvm import layout
from pykvm.boot.modes import (CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, set_mode,
                              write_identity_page_tables)
from pykvm.bus import Device
from pykvm.errors import GuestCrashed, KvmUnavailable
from pykvm.ioctl.structs import kvm_regs, kvm_sregs
from pykvm.kvm import Kvm
from pykvm.memory import GuestMemory
from pykvm.quirks import syscall
from pykvm.snapshot.state import SnapshotError
from pykvm.quirks.syscall import (MSR_CSTAR, MSR_LSTAR, MSR_SFMASK, MSR_STAR,
                                  SyscallCompletion, first_instruction)
from pykvm.observe.stats import VcpuStats
from pykvm.vstate.vcpu import Vcpu
from pykvm.vstate.vm import Vm

from ..asm import assemble as assemble_snippet

GUESTS = Path(__file__).parents[1] / "guests"
LOAD = layout.FLAT_LOAD_ADDR
RAM = 4 << 20

# Addresses tests/guests/syscall.S fixes.
SYSCALL_NCPUS = 0x12400
SYSCALL_COUNT = 0x13FF0
SYSCALL_REWRITE = 0x13FF8

BINUTILS = ("as", "ld", "nm")


# --- building and running the guests -------------------------------------------------------------
@dataclass
class Guest:
    binary: bytes
    symbols: dict[str, int]   # absolute addresses


def assemble(directory: Path, name: str, *defines: str) -> Guest:
    source = GUESTS / f"{name}.S"
    stem = "_".join((name,) + defines)
    obj, binary = directory / f"{stem}.o", directory / f"{stem}.bin"
    subprocess.run(["as", "--64", "-I", str(GUESTS), *(f"--defsym={d}=1" for d in defines),
                    "-o", str(obj), str(source)], check=True, capture_output=True)
    subprocess.run(["ld", f"-Ttext={LOAD:#x}", "--oformat", "binary", "-o", str(binary), str(obj)],
                   check=True, capture_output=True)
    listing = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
    symbols = {}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tT":
            symbols[parts[2]] = LOAD + int(parts[0], 16)
    return Guest(binary.read_bytes(), symbols)


class Serial(Device):
    name = "test-serial"

    def __init__(self):
        self.data = bytearray()
        self.lock = threading.Lock()

    def write(self, offset, size, value):
        if offset == 0:
            with self.lock:
                self.data.append(value & 0xFF)


class ExitPort(Device):
    name = "test-exit"

    def __init__(self, vm):
        self.vm = vm

    def write(self, offset, size, value):
        self.vm.request_stop("exit", value & 0xFF, "guest exit")


@dataclass
class Run:
    output: str
    stop: object
    per_vcpu: list[Counter]
    on_pvm: bool
    seconds: float
    watch_ended: bool

    @property
    def quirks(self) -> Counter:
        return sum(self.per_vcpu, Counter())

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()


def run_guest(guest: Guest, cpus: int = 1, pokes: dict[int, int] | None = None,
              timeout: float = 30) -> Run:
    try:
        kvm = Kvm()
    except KvmUnavailable as error:
        pytest.skip(str(error))
    with kvm, GuestMemory.anonymous(RAM) as memory:
        with Vm(kvm, memory) as vm:
            serial = Serial()
            vm.add_pio_device(0x3F8, 8, serial)
            vm.add_pio_device(layout.EXIT_PORT, 1, ExitPort(vm))
            memory.write(LOAD, guest.binary)
            for address, value in (pokes or {}).items():
                memory.write_u64(address, value)
            vm.create_vcpus(cpus)
            for index, vcpu in enumerate(vm.vcpus):
                set_mode(vcpu, memory, "long", LOAD, rsi=index)
                if index:
                    vcpu.set_mp_state(0)   # KVM_MP_STATE_RUNNABLE: no INIT/SIPI needed
            start = time.monotonic()
            stop = vm.run(timeout=timeout)
            seconds = time.monotonic() - start
            watch = getattr(getattr(vm.quirks, "syscalls", None), "_watch", None)
            if watch is not None:
                watch.join(timeout=2)
            return Run(serial.data.decode(errors="replace"), stop,
                       [Counter(v.stats.quirks) for v in vm.vcpus],
                       vm.quirks.name == "kvm_pvm", seconds,
                       watch is None or not watch.is_alive())


def assert_clean_exit(run: Run) -> None:
    assert run.stop is not None, f"guest did not finish; output so far:\n{run.output}"
    assert (run.stop.kind, run.stop.status) == ("exit", 0), f"{run.stop}\n{run.output}"


def host_has_smap() -> bool:
    """Whether a guest may run clac/stac (CPUID.7.0:EBX bit 20, as the guest sees it)."""
    try:
        with Kvm() as kvm:
            return kvm.host_kind == "kvm_pvm" or any(
                e.function == 7 and e.index == 0 and e.ebx & (1 << 20)
                for e in kvm.supported_cpuid())
    except KvmUnavailable:
        return False


# --- (a)-(d): ring-0 instructions ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ring0(tmp_path_factory):
    if not all(shutil.which(tool) for tool in BINUTILS):
        pytest.skip("GNU binutils not installed")
    guest = assemble(tmp_path_factory.mktemp("ring0"), "ring0")
    return guest, run_guest(guest)


def expected_count(run: Run, n: int) -> int:
    return n if run.on_pvm else 0


def test_ring0_guest_exits_cleanly(ring0):
    _, run = ring0
    assert_clean_exit(run)
    assert "unexpected" not in run.output


def test_int3_runs_the_guests_breakpoint_handler(ring0):
    guest, run = ring0
    assert f"int3 handler: rax=0xb0b rip={guest.symbols['after_int3']:#x}" in run.lines
    assert run.quirks["int3"] == expected_count(run, 1)


def test_int_0x80_runs_vector_0x80(ring0):
    guest, run = ring0
    assert f"int 0x80 handler: rax=0xcafe rip={guest.symbols['after_int80']:#x}" in run.lines
    assert run.quirks["int n"] == expected_count(run, 1)


def test_clac_and_stac_change_rflags_ac(ring0):
    _, run = ring0
    if "no smap" in run.lines:
        pytest.skip("this host offers no SMAP: clac/stac would be #UD")
    assert "stac: ac=0x1 clac: ac=0x0" in run.lines
    assert run.quirks["clac/stac"] == expected_count(run, 2)


def test_fwait(ring0):
    _, run = ring0
    assert "fwait done" in run.lines
    assert run.quirks["fwait"] == expected_count(run, 1)


def test_no_other_completions(ring0):
    _, run = ring0
    if run.on_pvm:
        assert set(run.quirks) == {"int3", "int n", "clac/stac", "fwait"}
    else:
        assert not run.quirks


# --- (e): system calls from ring 3, and a genuine user page fault ---------------------------------------
@pytest.fixture(scope="module")
def syscall_guests(tmp_path_factory):
    if not all(shutil.which(tool) for tool in BINUTILS):
        pytest.skip("GNU binutils not installed")
    directory = tmp_path_factory.mktemp("syscall")
    return {"nop": assemble(directory, "syscall"), "clac": assemble(directory, "syscall", "PF_CLAC")}


def expected_lines(cpu: int, count: int, extra: tuple[str, ...] = ()) -> list[str]:
    lines = [f"cpu {cpu:#x}: to user mode"]
    lines += [f"cpu {cpu:#x}: syscall {i:#x} cs=0x10 ss=0x18" for i in range(count)]
    lines += list(extra)
    lines += [f"page fault at {syscall_demand_page(cpu):#x} error 0x6: mapped",
              f"cpu {cpu:#x}: read back 0x600df00d", f"cpu {cpu:#x}: exit"]
    return lines


def syscall_demand_page(cpu: int) -> int:
    return 0x1F0000 + cpu * 0x1000


@pytest.mark.parametrize("handler_start", ["nop", "clac"])
def test_syscalls_from_user_mode(syscall_guests, handler_start):
    if handler_start == "clac" and not host_has_smap():
        pytest.skip("this host offers no SMAP: a handler starting with clac would be #UD")
    count = 5
    run = run_guest(syscall_guests[handler_start], pokes={SYSCALL_COUNT: count})
    assert_clean_exit(run)
    # The user process checked RCX (return address), R11 (RFLAGS) and RAX after each
    # sysretq, the kernel checked CS, SS and that SFMASK cleared IF: any failure prints.
    assert run.lines == expected_lines(0, count)
    if run.on_pvm:
        assert run.quirks == Counter({
            "syscall": count + 2,                 # the prints, the read-back, the exit
            "page fault passed through": 1,      # the write to the unmapped page
            "page-fault hook planted": 1,
            "fwait": 1,                          # the kernel's, before ring 3
        })
    else:
        assert not run.quirks
    assert run.watch_ended


def test_first_syscall_microseconds_after_lidt(syscall_guests, tmp_path):
    """No emulation stop between the guest's lidt and its first system call, only the
    port writes of one line: the early watch (syscall.EarlyPlant) plants the hook at
    one of those exits, and then disarms itself."""
    guest = assemble(tmp_path, "syscall", "NO_STOP")
    count = 3
    run = run_guest(guest, pokes={SYSCALL_COUNT: count})
    assert_clean_exit(run)
    assert run.lines == expected_lines(0, count)
    if run.on_pvm:
        assert run.quirks == Counter({"syscall": count + 2, "page fault passed through": 1,
                                      "page-fault hook planted": 1})
    else:
        assert not run.quirks


def test_early_watch_looks_only_after_the_idt_or_paging_changes(monkeypatch):
    """A guest that never gets a plantable #PF handler costs one full look at its first
    exit and at the first exit after its lidt (each for EARLY_WINDOW exits), not one per
    exit: in between only the registers KVM stored in kvm_run are compared."""
    if not all(shutil.which(tool) for tool in BINUTILS):
        pytest.skip("GNU binutils not installed")
    loops = 3 * syscall.EARLY_WINDOW
    binary = assemble_snippet(f"""
        mov ${loops}, %ecx
    1:  out %al, $0x80
        dec %ecx
        jnz 1b
        lidt idtr(%rip)           # a 16-byte IDT with nothing present
        mov ${loops}, %ecx
    2:  out %al, $0x80
        dec %ecx
        jnz 2b
        xor %eax, %eax
        out %al, ${layout.EXIT_PORT:#x}
    3:  jmp 3b
        .balign 16
    idt: .quad 0, 0
    idtr: .word 15
        .quad idt
    """, "long", LOAD)
    looks = Counter()
    synced = Vcpu.synced_sregs
    monkeypatch.setattr(Vcpu, "synced_sregs", lambda self: (looks.update([self.id]),
                                                            synced(self))[1])
    run = run_guest(Guest(binary, {}))
    assert_clean_exit(run)
    if not run.on_pvm:
        assert not looks
        return
    assert looks == Counter({0: 2 * (1 + syscall.EARLY_WINDOW)})
    assert not run.quirks


def test_rewritten_handler_is_planted_again(syscall_guests):
    """The guest kernel rewrites its #PF handler's first bytes twice (0f 1f 00 -> 90 66 90
    -> 0f 1f 00, as Linux patches its text); pykvm re-plants at the next emulation stop,
    then from its watch thread, and system calls keep working."""
    run = run_guest(syscall_guests["nop"], pokes={SYSCALL_COUNT: 2, SYSCALL_REWRITE: 1})
    assert_clean_exit(run)
    rewrote = "cpu 0x0: rewrote the page-fault handler"
    assert run.lines == expected_lines(0, 2, (
        rewrote, "cpu 0x0: syscall 0x10 cs=0x10 ss=0x18",
        rewrote, "cpu 0x0: syscall 0x11 cs=0x10 ss=0x18"))
    if run.on_pvm:
        assert run.quirks["page-fault hook planted"] == 3
        assert run.quirks["syscall"] == 2 + 4 + 2
        assert run.quirks["page fault passed through"] == 1
        assert run.seconds < 5 * syscall.CHECK_INTERVAL


def test_syscalls_on_two_vcpus(syscall_guests):
    """Two vCPUs in ring 3 at once share the one planted #PF handler."""
    count = 40
    run = run_guest(syscall_guests["nop"], cpus=2, pokes={SYSCALL_COUNT: count, SYSCALL_NCPUS: 2})
    assert_clean_exit(run)
    for cpu in (0, 1):
        mine = [line for line in run.lines
                if line.startswith(f"cpu {cpu:#x}:") or f"{syscall_demand_page(cpu):#x} " in line]
        assert mine == expected_lines(cpu, count)
    assert len(run.lines) == 2 * len(expected_lines(0, count))
    if run.on_pvm:
        for counts in run.per_vcpu:
            assert counts["syscall"] == count + 2
            assert counts["page fault passed through"] == 1
        assert run.quirks["page-fault hook planted"] == 1
        assert run.quirks["int3"] == 0


# --- (f) the completion itself, on a fake vCPU (no KVM) ------------------------------------------------
IDT = 0x30000
HANDLER = 0x40000
STACK = 0x50000
LSTAR = 0x60000
CSTAR = 0x61000
STAR = (0x23 << 48) | (0x10 << 32)
SFMASK = 0x47700
USER_CS, USER_SS, USER_RSP, USER_RFLAGS = 0x33, 0x2B, 0x7FFF0000, 0x246


class FakeVcpu:
    """What SyscallCompletion uses of a Vcpu, over plain guest memory."""

    def __init__(self, memory):
        self.id = 0
        self.memory = memory
        self.stats = VcpuStats(0)
        self.msrs = {MSR_STAR: STAR, MSR_LSTAR: LSTAR, MSR_CSTAR: CSTAR, MSR_SFMASK: SFMASK}
        self.regs = self.sregs = None

    def get_msrs(self, indices):
        return {i: self.msrs[i] for i in indices if i in self.msrs}

    def set_regs(self, regs):
        self.regs = regs

    def set_sregs(self, sregs):
        self.sregs = sregs


@pytest.fixture
def memory():
    with GuestMemory.anonymous(RAM) as mem:
        write_identity_page_tables(mem)
        yield mem


def long_mode_sregs() -> kvm_sregs:
    sregs = kvm_sregs()
    sregs.cr0, sregs.cr4 = CR0_PE | CR0_PG, CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    sregs.cr3 = layout.PML4_ADDR
    sregs.idt.base, sregs.idt.limit = IDT, 256 * 16 - 1
    return sregs


def set_pf_gate(memory, handler: int) -> None:
    memory.write(IDT + 14 * 16, struct.pack("<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E,
                                            (handler >> 16) & 0xFFFF, handler >> 32, 0))


def at_handler(memory, frame_rip, frame_cs, error=0x15, rflags=USER_RFLAGS):
    """Registers of a vCPU stopped at the handler with a #PF frame on its stack."""
    memory.write(STACK, struct.pack("<6Q", error, frame_rip, frame_cs, rflags, USER_RSP, USER_SS))
    regs = kvm_regs()
    regs.rip, regs.rsp, regs.rflags = HANDLER, STACK, 0x2
    regs.rcx, regs.r11 = 0x401234, USER_RFLAGS
    return regs


@pytest.mark.parametrize("code, expected", [
    ("90", (1, "nop")),
    ("66 90", (2, "nop")),
    ("0f 1f 00", (3, "nop")),
    ("0f 1f 40 00", (4, "nop")),
    ("0f 1f 44 00 00", (5, "nop")),
    ("66 0f 1f 44 00 00", (6, "nop")),
    ("0f 1f 80 00 00 00 00", (7, "nop")),
    ("0f 1f 84 00 00 00 00 00", (8, "nop")),
    ("66 2e 0f 1f 84 00 00 00 00 00", (10, "nop")),
    ("0f 01 ca", (3, "clac")),
    ("f3 0f 1e fa 0f 01 ca", (4, "nop")),     # endbr64; clac: Linux built with IBT
    ("f3 0f 1e fa 6a 0e", None),              # endbr64; push $14: Linux's early handler
    ("6a 0e e9 00 00 00 00", None),           # push $14: the same without IBT
    ("f3 90", None),                          # pause
    ("41 90", None),                          # xchg %r8, %rax
    ("0f 1f 48 00", None),                    # 0f 1f /1: not the NOP encoding
    ("0f 1f 84 00", None),                    # cut short
    ("cc", None),
])
def test_first_instruction(code, expected):
    assert first_instruction(bytes.fromhex(code)) == expected


def test_plant_waits_for_the_final_handler(memory):
    vcpu, completion, sregs = FakeVcpu(memory), SyscallCompletion(), long_mode_sregs()
    early = 0x41000
    memory.write(early, bytes.fromhex("6a 0e e9 00 00 00 00"))
    set_pf_gate(memory, early)
    completion.check(vcpu, sregs)
    assert not completion.plants and memory.read_u8(early) == 0x6A
    memory.write(HANDLER, bytes.fromhex("0f 1f 00 50 53"))
    set_pf_gate(memory, HANDLER)
    completion.check(vcpu, sregs)
    completion.check(vcpu, sregs)     # idempotent
    assert memory.read(HANDLER, 3) == bytes.fromhex("cc 1f 00")
    (plant,) = completion.plants
    assert (plant.handler, plant.physical, plant.displaced, plant.kind) == \
        (HANDLER, HANDLER, bytes.fromhex("0f 1f 00"), "nop")
    assert vcpu.stats.quirks["page-fault hook planted"] == 1


def test_no_plant_outside_long_mode_or_without_a_gate(memory):
    vcpu, completion = FakeVcpu(memory), SyscallCompletion()
    memory.write(HANDLER, b"\x90")
    set_pf_gate(memory, HANDLER)
    protected = long_mode_sregs()
    protected.efer, protected.cr0 = 0, CR0_PE
    completion.check(vcpu, protected)
    no_idt = long_mode_sregs()
    no_idt.idt.limit = 14 * 16 - 1
    completion.check(vcpu, no_idt)
    unmapped_idt = long_mode_sregs()
    unmapped_idt.idt.base = 0x7FFF_0000_0000
    completion.check(vcpu, unmapped_idt)
    assert not completion.plants and memory.read_u8(HANDLER) == 0x90


def test_rewritten_text_is_planted_again(memory):
    vcpu, completion, sregs = FakeVcpu(memory), SyscallCompletion(), long_mode_sregs()
    memory.write(HANDLER, bytes.fromhex("90 90 90"))
    set_pf_gate(memory, HANDLER)
    completion.check(vcpu, sregs)
    memory.write(HANDLER, bytes.fromhex("90 66 90"))    # the kernel rewrote its text
    completion.check(vcpu, sregs)
    assert memory.read(HANDLER, 3) == bytes.fromhex("cc 66 90")
    memory.write(HANDLER, bytes.fromhex("0f 01 ca"))    # and again, to clac
    completion.check(vcpu, sregs)
    (plant,) = completion.plants
    assert (plant.displaced, plant.kind) == (bytes.fromhex("0f 01 ca"), "clac")
    assert vcpu.stats.quirks["page-fault hook planted"] == 3


def test_a_moved_idt_keeps_the_plant_and_a_new_handler_gets_one(memory):
    vcpu, completion, sregs = FakeVcpu(memory), SyscallCompletion(), long_mode_sregs()
    memory.write(HANDLER, b"\x90")
    set_pf_gate(memory, HANDLER)
    completion.check(vcpu, sregs)
    memory.write(IDT + 0x1000 + 14 * 16, memory.read(IDT + 14 * 16, 16))
    sregs.idt.base = IDT + 0x1000                      # same handler, IDT elsewhere
    completion.check(vcpu, sregs)
    assert vcpu.stats.quirks["page-fault hook planted"] == 1
    other = HANDLER + 0x800
    memory.write(other, bytes.fromhex("66 90"))
    set_pf_gate(memory, other)                          # the first IDT, now another handler
    sregs.idt.base = IDT
    completion.check(vcpu, sregs)
    assert sorted(p.handler for p in completion.plants) == [HANDLER, other]


def planted(memory, code: str) -> tuple[FakeVcpu, SyscallCompletion, kvm_sregs]:
    vcpu, completion, sregs = FakeVcpu(memory), SyscallCompletion(), long_mode_sregs()
    memory.write(HANDLER, bytes.fromhex(code))
    set_pf_gate(memory, HANDLER)
    completion.check(vcpu, sregs)
    return vcpu, completion, sregs


def test_syscall_is_completed(memory):
    vcpu, completion, sregs = planted(memory, "0f 1f 00")
    regs = at_handler(memory, LSTAR, USER_CS, rflags=USER_RFLAGS & ~0x200)
    assert completion.complete(vcpu, regs, sregs)
    regs, sregs = vcpu.regs, vcpu.sregs
    assert (regs.rip, regs.rsp, regs.rflags) == (LSTAR, USER_RSP, 0x46)
    assert (regs.rcx, regs.r11) == (0x401234, USER_RFLAGS)     # what SYSCALL stored
    cs, ss = sregs.cs, sregs.ss
    assert (cs.selector, cs.base, cs.limit, cs.type, cs.s, cs.dpl, cs.present, cs.l, cs.db, cs.g) \
        == (0x10, 0, 0xFFFFFFFF, 0xB, 1, 0, 1, 1, 0, 1)
    assert (ss.selector, ss.base, ss.limit, ss.type, ss.s, ss.dpl, ss.present, ss.db, ss.g) \
        == (0x18, 0, 0xFFFFFFFF, 0x3, 1, 0, 1, 1, 1)
    assert vcpu.stats.quirks["syscall"] == 1


def test_32bit_syscall_goes_to_cstar(memory):
    vcpu, completion, sregs = planted(memory, "90")
    regs = at_handler(memory, CSTAR, 0x23)
    assert completion.complete(vcpu, regs, sregs)
    assert (vcpu.regs.rip, vcpu.sregs.cs.selector) == (CSTAR, 0x10)


def test_a_user_jump_to_lstar_gets_sfmask_applied(memory):
    """Without SYSCALL the frame RFLAGS still has IF/TF/AC: the kernel must not get them."""
    vcpu, completion, sregs = planted(memory, "90")
    regs = at_handler(memory, LSTAR, USER_CS, rflags=0x40302 | (1 << 16))   # AC TF IF RF
    assert completion.complete(vcpu, regs, sregs)
    assert vcpu.regs.rflags == 0x2


@pytest.mark.parametrize("frame_rip, frame_cs, error", [
    (0x401000, USER_CS, 0x15),      # a user fetch fault elsewhere
    (LSTAR, 0x10, 0x11),            # a kernel-mode fault at LSTAR
    (LSTAR, USER_CS, 0x07),         # a user write to LSTAR
])
def test_genuine_page_faults_pass_through(memory, frame_rip, frame_cs, error):
    vcpu, completion, sregs = planted(memory, "0f 1f 00")
    regs = at_handler(memory, frame_rip, frame_cs, error)
    frame = memory.read(STACK, 48)
    assert completion.complete(vcpu, regs, sregs)
    assert (vcpu.regs.rip, vcpu.regs.rsp, vcpu.regs.rflags) == (HANDLER + 3, STACK, 0x2)
    assert vcpu.sregs is None and memory.read(STACK, 48) == frame
    assert vcpu.stats.quirks == Counter({"page-fault hook planted": 1,
                                         "page fault passed through": 1})


def test_displaced_clac_is_performed(memory):
    vcpu, completion, sregs = planted(memory, "0f 01 ca")
    regs = at_handler(memory, 0x401000, USER_CS)
    regs.rflags = 0x2 | (1 << 18)
    assert completion.complete(vcpu, regs, sregs)
    assert (vcpu.regs.rip, vcpu.regs.rflags) == (HANDLER + 3, 0x2)


def test_exits_elsewhere_or_after_the_guest_rewrote_the_byte_are_not_ours(memory):
    vcpu, completion, sregs = planted(memory, "90")
    regs = at_handler(memory, 0x401000, USER_CS)
    regs.rip = HANDLER + 0x100
    assert not completion.complete(vcpu, regs, sregs)
    memory.write_u8(HANDLER, 0x90)
    assert not completion.complete(vcpu, at_handler(memory, 0x401000, USER_CS), sregs)
    assert vcpu.regs is None


def test_an_unreadable_frame_is_a_guest_crash(memory):
    vcpu, completion, sregs = planted(memory, "90")
    regs = at_handler(memory, LSTAR, USER_CS)
    regs.rsp = 0x7FFF_FFFF_F000
    with pytest.raises(GuestCrashed, match="exception frame at rsp 0x7ffffffff000"):
        completion.complete(vcpu, regs, sregs)


def test_unplant_gives_the_bytes_back(memory):
    _, completion, _ = planted(memory, "0f 1f 00")
    completion.unplant(memory)
    assert memory.read(HANDLER, 3) == bytes.fromhex("0f 1f 00") and not completion.plants


def test_plants_survive_a_snapshot(memory):
    """Guest RAM saved after planting holds the int3: a restored VM must know it as ours."""
    vcpu, completion, sregs = planted(memory, "0f 1f 00")
    state = completion.save_state()
    assert state == (syscall.Plant(HANDLER, HANDLER, bytes.fromhex("0f1f00"), "nop"),)
    restored = SyscallCompletion()
    restored.restore_state(state)
    assert restored.complete(vcpu, at_handler(memory, 0x401000, USER_CS), sregs)
    assert vcpu.regs.rip == HANDLER + 3
    with pytest.raises(SnapshotError, match="not a page-fault hook pykvm could have planted"):
        syscall.Plant.from_json({**state[0].to_json(), "kind": "jmp"}, "quirks.plants[0]")
