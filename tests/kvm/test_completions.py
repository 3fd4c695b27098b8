"""Instructions pykvm completes when kvm_pvm's emulator refuses them (pykvm/quirks/complete.py).

Each completed instruction runs in a flat ring-0 guest (tests/guests/complete_*.S) and
the guest checks the architectural result: register and memory values read back by
instructions the emulator does run (fxsave for MXCSR), RIP past the instruction
(the guest goes on, once), RFLAGS unchanged, and every exception the SDM lists
raised with its error code, faulting RIP and CR2. The same output is required on
every host; on kvm_pvm the --stats counters must show pykvm did the work.

Also here: the decoder against capstone, the guest-memory access checks, and the
one-line stop for an instruction pykvm does not complete.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter

import pytest

from pykvm.boot.modes import CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, write_identity_page_tables
from pykvm import layout
from pykvm.guest.access import Access, PageFault, locate
from pykvm.ioctl.structs import kvm_sregs
from pykvm.memory import GuestMemory
from pykvm.quirks.complete import COMPLETIONS, find
from pykvm.quirks.decode import decode

from ..conftest import needs_kvm
from .test_quirks import BINUTILS, assemble, assert_clean_exit, run_guest

RO_PAGE = 0x200000
UNMAPPED = 0x8000000000


@pytest.fixture(scope="module")
def mxcsr(tmp_path_factory):
    if not all(shutil.which(tool) for tool in BINUTILS):
        pytest.skip("GNU binutils not installed")
    guest = assemble(tmp_path_factory.mktemp("complete"), "complete_mxcsr")
    run = run_guest(guest)
    assert_clean_exit(run)
    cases = {}
    for line in run.lines:
        name, _, rest = line.partition(":")
        assert name not in cases, f"{name} printed twice:\n{run.output}"
        cases[name] = rest.strip()
    return guest, run, cases


def loaded(value: int) -> str:
    """What report prints after MXCSR = value was loaded with RFLAGS = 0x8d5 before."""
    return f"fx={value:#x} st={0xFFFFFFFF00000000 | value:#x} flags=0x8d7"


@pytest.mark.parametrize("case, value", [
    ("rdi", 0x9F80),        # 0f ae 17
    ("rsp+4", 0x3F80),      # 0f ae 54 24 04: SIB, base rsp, disp8 (Debian's cloud kernel)
    ("rip", 0x5F80),        # RIP-relative disp32
    ("sib", 0x7F80),        # 43 0f ae 94 8d 00 01 00 00: REX.B/X, scale 4, disp32
    ("r12", 0x1F81),        # REX.B, SIB needed; a flag bit loads too
    ("r13", 0x1E80),        # REX.B, mod 01 with disp8 0
    ("addr32", 0x9F80),     # 67: only the low 32 bits of rax
    ("gs", 0x3F80),         # gs: segment base from GS_BASE
    ("split", 0x5F80),      # two bytes on each side of a page boundary
])
def test_ldmxcsr_loads_mxcsr(mxcsr, case, value):
    """fxsave (run by the host) sees the MXCSR pykvm loaded; stmxcsr reads it back into
    exactly 4 bytes; RFLAGS is untouched; the guest went on (RIP advanced once)."""
    _, _, cases = mxcsr
    assert cases[case] == loaded(value)


def test_stmxcsr_stores_four_bytes(mxcsr):
    _, _, cases = mxcsr
    assert cases["st-rip"] == f"mem={0xFFFFFFFF00005F80:#x} flags=0x8d7"
    # One byte before a page boundary and three after; the bytes around stay.
    assert cases["st-split"] == f"mem={0x00005F80FFFFFFFF:#x} {(1 << 64) - 1:#x}"


def fault(guest, label: str, vector: int, error: int = 0, cr2: int | None = None) -> str:
    text = f"vector {vector:#x} error {error:#x} rip {guest.symbols[label]:#x}"
    return text if cr2 is None else f"{text} cr2 {cr2:#x}"


def test_reserved_mxcsr_bit_is_gp_and_changes_nothing(mxcsr):
    guest, _, cases = mxcsr
    assert cases["reserved"].startswith(fault(guest, "gp_reserved", 13) + " fx=0x5f80 ")


@pytest.mark.parametrize("case, label, error, cr2, after", [
    ("unmapped-load", "pf_load", 0x0, UNMAPPED + 0x10, " fx=0x5f80 "),
    ("unmapped-store", "pf_store", 0x2, UNMAPPED + 0xFFE, ""),
    ("read-only", "pf_read_only", 0x3, RO_PAGE, " kept=0x12345678"),   # CR0.WP, P|W
])
def test_page_faults(mxcsr, case, label, error, cr2, after):
    guest, _, cases = mxcsr
    assert cases[case].startswith(fault(guest, label, 14, error, cr2) + after)


@pytest.mark.parametrize("case, label, vector", [
    ("noncanonical", "gp_noncanonical", 13),
    ("noncanonical-rbp", "ss_noncanonical", 12),   # rbp-based: the stack segment
    ("lock", "ud_lock", 6),
    ("ts", "nm_ts", 7),
    ("no-osfxsr", "ud_osfxsr", 6),
])
def test_other_exceptions(mxcsr, case, label, vector):
    guest, _, cases = mxcsr
    assert cases[case] == fault(guest, label, vector)


def test_xgetbv(mxcsr):
    guest, _, cases = mxcsr
    if "no xsave" in cases:
        pytest.skip("this host offers no XSAVE: xgetbv is #UD whatever CR4 says")
    assert cases["xgetbv-ud"] == fault(guest, "ud_xgetbv", 6)
    assert cases["xgetbv"] == "rax=0x3 rdx=0x0 flags=0x8d7"   # upper halves cleared
    assert cases["xgetbv-ecx"] == fault(guest, "gp_xgetbv", 13)


def test_completions_are_counted(mxcsr):
    _, run, cases = mxcsr
    assert "done" in cases
    if not run.on_pvm:
        assert not run.quirks
        return
    assert run.quirks == Counter({
        "ldmxcsr": 9, "stmxcsr": 2 + 11,          # 11 in report
        "ldmxcsr: #GP": 2, "ldmxcsr: #PF": 1, "ldmxcsr: #SS": 1, "ldmxcsr: #UD": 2,
        "stmxcsr: #PF": 2, "stmxcsr: #NM": 1,
        "xgetbv": 1, "xgetbv: #UD": 1, "xgetbv: #GP": 1,
    })


# --- an instruction pykvm does not complete --------------------------------------------
@needs_kvm
def test_unknown_instruction_stops_with_one_line(tmp_path):
    if not all(shutil.which(tool) for tool in BINUTILS):
        pytest.skip("GNU binutils not installed")
    guest = assemble(tmp_path, "complete_unknown")
    flat = tmp_path / "unknown.bin"
    flat.write_bytes(guest.binary)
    system_map = tmp_path / "System.map"
    system_map.write_text("".join(f"{address:016x} t {name}\n"
                                  for name, address in sorted(guest.symbols.items())))
    result = subprocess.run([sys.executable, "-m", "pykvm", "run", "--flat", str(flat),
                             "--entry", "long", "--symbols", str(system_map)],
                            capture_output=True, text=True, timeout=60)
    from pykvm.kvm import detect_host_kind
    if detect_host_kind() != "kvm_pvm":
        assert (result.returncode, result.stdout) == (0, "before\nafter\n")
        return
    assert result.stdout == "before\n"
    assert result.returncode == 3, result.stderr            # the "guest crashed" class
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    refused = guest.symbols["refused"]
    try:
        import capstone  # noqa: F401
        what = "`popcnt rax, rax` (f3 48 0f b8 c0)"
    except ImportError:
        what = "bytes f3 48 0f b8 c0"
    assert line == (f"pykvm: error: vCPU 0: the host's instruction emulator (kvm_pvm) cannot "
                    f"run {what} at {refused:#x} (refused), and pykvm does not complete it; "
                    f"see docs/hosts.md")


def test_operand_outside_guest_ram_stops_the_vm(tmp_path):
    if not all(shutil.which(tool) for tool in BINUTILS):
        pytest.skip("GNU binutils not installed")
    guest = assemble(tmp_path, "complete_unknown", "NOT_RAM")
    run = run_guest(guest)
    if not run.on_pvm:
        pytest.skip("only kvm_pvm hands this instruction to pykvm")
    assert run.lines == ["before"]
    assert run.stop.kind == "crash" and run.stop.status == 3
    assert run.stop.message == (f"vCPU 0: the instruction at {guest.symbols['refused']:#x} "
                                f"reads 0x1000000, which is not guest RAM")


# --- the decoder -----------------------------------------------------------------------
ENCODINGS = [
    "0f ae 54 24 04", "0f ae 17", "0f ae 1f", "cc", "cd 80", "0f 01 ca", "0f 01 cb", "9b",
    "0f 01 d0", "41 0f ae 94 24 78 56 34 12", "0f ae 15 10 00 00 00",
    "42 0f ae 14 85 00 10 00 00", "67 0f ae 10", "65 0f ae 14 25 00 01 00 00",
    "43 0f ae 1c 24", "41 0f ae 5d 00", "0f ae 5c 24 f0", "0f ae 9c 24 00 01 00 00",
    "48 b8 11 22 33 44 55 66 77 88", "f6 c1 01", "f7 c1 01 00 00 00", "f7 d1",
    "0f 84 00 00 00 00", "e8 00 00 00 00", "66 0f 3a 0f c1 08", "c8 10 00 01",
    "4c 8b 44 8d f8", "66 0f ae 37", "f3 48 0f ae d0", "f3 48 0f b8 c0", "0f 1f 44 00 00",
    "66 2e 0f 1f 84 00 00 00 00 00", "48 a1 88 77 66 55 44 33 22 11", "c2 08 00", "6a 0e",
]


@pytest.mark.parametrize("code", ENCODINGS)
def test_decoder_length_and_operand_agree_with_capstone(code):
    capstone = pytest.importorskip("capstone")
    engine = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    engine.detail = True
    raw = bytes.fromhex(code) + b"\x90" * 4
    expected = next(engine.disasm(raw, 0x1000))
    ours = decode(raw)
    assert ours is not None and ours.length == expected.size
    memory = [op.mem for op in expected.operands if op.type == capstone.x86.X86_OP_MEM]
    if ours.modrm is not None and ours.mod != 3:
        (mem,) = memory
        assert ours.memory.displacement == mem.disp
        assert ours.memory.scale == (mem.scale if mem.index else 1)
        names = (None, "rip", "eip")
        base = expected.reg_name(mem.base) if mem.base else None
        assert ours.memory.rip_relative == (base == "rip")
        if base not in names:
            assert GPR_64[ours.memory.base] == _widen(base)
        index = expected.reg_name(mem.index) if mem.index else None
        assert (GPR_64[ours.memory.index] if ours.memory.index is not None else None) == \
            (_widen(index) if index else None)


GPR_64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _widen(name: str) -> str:
    if name.startswith("e"):
        return "r" + name[1:]
    return name[:-1] if name.startswith("r") and name.endswith("d") else name


@pytest.mark.parametrize("code", ["0f ae 15 10 00 00 00", "0f ae 54 24 04", "41", "48",
                                  "0f ae 14 85 00 10 00 00", "66 b8 34 12", "b8 78 56 34 12"])
def test_decoder_in_32_bit_code(code):
    """No REX in 32-bit code (40-4f are inc/dec), and mod 00 r/m 101 is disp32 alone."""
    capstone = pytest.importorskip("capstone")
    raw = bytes.fromhex(code) + b"\x90" * 4
    expected = next(capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32).disasm(raw, 0))
    ours = decode(raw, bits=32)
    assert ours is not None and ours.length == expected.size and ours.rex == 0
    if ours.memory is not None:
        assert not ours.memory.rip_relative and ours.memory.address_bits == 32


@pytest.mark.parametrize("code", ["", "0f", "0f ae", "0f ae 54 24", "0f ae 15 10 00",
                                  "cd", "66 66 66 66 66 66 66 66 66 66 66 66 66 66 0f ae 17",
                                  "c5 f8 77"])
def test_decoder_refuses_what_it_cannot_read(code):
    assert decode(bytes.fromhex(code)) is None


@pytest.mark.parametrize("code, name", [
    ("0f ae 17", "ldmxcsr"), ("0f ae 1f", "stmxcsr"), ("0f 01 d0", "xgetbv"), ("cc", "int3"),
    ("cd 80", "int n"), ("0f 01 ca", "clac/stac"), ("9b", "fwait"),
    ("0f ae d7", None),          # mod 3: not ldmxcsr
    ("f3 0f ae d7", None),       # wrfsbase
    ("66 0f ae 37", None),       # clwb: same opcode and /digit family, a mandatory prefix
    ("0f ae 27", None),          # xsave
    ("f3 48 0f b8 c0", None),    # popcnt
])
def test_table_lookup(code, name):
    found = find(decode(bytes.fromhex(code)))
    assert (found.name if found else None) == name


def test_every_row_has_a_name():
    assert all(row.name and row.opcode for row in COMPLETIONS)


# --- guest-memory access checks --------------------------------------------------------
@pytest.fixture
def memory():
    with GuestMemory.anonymous(4 << 20) as mem:
        write_identity_page_tables(mem)
        yield mem


def paged_sregs(cr0_wp: bool = False) -> kvm_sregs:
    sregs = kvm_sregs()
    sregs.cr0 = CR0_PE | CR0_PG | ((1 << 16) if cr0_wp else 0)
    sregs.cr4, sregs.efer, sregs.cr3 = CR4_PAE, EFER_LME | EFER_LMA, layout.PML4_ADDR
    return sregs


def test_access_splits_at_the_page_boundary(memory):
    where = locate(memory, paged_sregs(), 0x10FFE, 4, write=True)
    assert where == Access(((0x10FFE, 2), (0x11000, 2)))
    where.write(memory, b"\x01\x02\x03\x04")
    assert where.read(memory) == b"\x01\x02\x03\x04" == memory.read(0x10FFE, 4)


def test_access_to_an_unmapped_page_is_a_page_fault(memory):
    assert locate(memory, paged_sregs(), UNMAPPED + 8, 4, write=False) == \
        PageFault(UNMAPPED + 8, 0)
    # The second page of a split access: CR2 is its first byte, the write bit is kept.
    assert locate(memory, paged_sregs(), (4 << 30) - 2, 4, write=True) == \
        PageFault(4 << 30, 0x2)


def test_read_only_page_faults_only_with_cr0_wp(memory):
    memory.write_u64(layout.PD_ADDR + 8, RO_PAGE | 0x81)      # present, 2 MiB, read-only
    assert isinstance(locate(memory, paged_sregs(), RO_PAGE, 4, write=True), Access)
    assert locate(memory, paged_sregs(cr0_wp=True), RO_PAGE, 4, write=True) == \
        PageFault(RO_PAGE, 0x3)
    assert isinstance(locate(memory, paged_sregs(cr0_wp=True), RO_PAGE, 4, write=False), Access)
    assert locate(memory, paged_sregs(), RO_PAGE, 4, write=True, cpl=3) == \
        PageFault(RO_PAGE, 0x7)   # user pages: PD entries above lack U/S too
