"""pykvm's ctypes declarations against the system's <linux/kvm.h>, compiled.

A C program generated from pykvm/ioctl prints sizeof/offsetof of every struct
and field pykvm declares and the value of every constant it names; the test
asserts that pykvm's figures are the same. No KVM needed: only gcc and the
kernel headers (Debian's linux-libc-dev).
"""

import ctypes
import shutil
import subprocess

import pytest

from pykvm.ioctl import requests, structs

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


def top_level_structs():
    """The structs with a C name of their own (anonymous C parts are reached through them)."""
    names = []
    for name, value in vars(structs).items():
        if isinstance(value, type) and issubclass(value, (ctypes.Structure, ctypes.Union)) \
                and value.__module__ == structs.__name__ and name.startswith("kvm_") \
                and value.__bases__[0] in (structs.KvmStruct, ctypes.Union):
            names.append(name)
    return [n for n in names if n not in ANONYMOUS_IN_C]


# Declared as named classes here, anonymous (or differently named) in the header.
ANONYMOUS_IN_C = {
    "kvm_vcpu_events_exception", "kvm_vcpu_events_interrupt", "kvm_vcpu_events_nmi",
    "kvm_vcpu_events_smi", "kvm_vcpu_events_triple_fault", "kvm_irqchip_union",
    "kvm_irq_routing_entry_u", "kvm_run_io", "kvm_run_mmio", "kvm_run_internal",
    "kvm_run_system_event", "kvm_run_fail_entry", "kvm_run_debug", "kvm_run_hw",
    "kvm_run_ex", "kvm_run_msr", "kvm_run_exit", "kvm_run_sync",
}


def field_paths(cls, prefix=""):
    """(C member designator, python offset, python size) for every field, recursively."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype in cls._fields_:
        descriptor = getattr(cls, name)
        path = prefix if name in anonymous else f"{prefix}{name}"
        if name not in anonymous:
            yield path, descriptor.offset, descriptor.size
        if isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union)):
            inner = (path + ".") if path else ""
            for sub, off, size in field_paths(ctype, inner):
                yield sub, descriptor.offset + off, size


def constants():
    for name, value in vars(requests).items():
        if name.startswith(("KVM_", "KVMIO")) and isinstance(value, int) \
                and not name.startswith("KVM_CAP_NAMES"):
            yield name, value


def c_program():
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "#define MEMBER_SIZE(t, m) sizeof(((t *)0)->m)", "int main(void) {"]
    for struct in top_level_structs():
        cls = getattr(structs, struct)
        kind = "union" if issubclass(cls, ctypes.Union) else "struct"
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof({kind} {struct}));')
        for path, _, _ in field_paths(cls):
            lines.append(f'printf("offsetof {struct}.{path} %zu\\n", offsetof({kind} {struct}, {path}));')
            lines.append(f'printf("sizeof {struct}.{path} %zu\\n", MEMBER_SIZE({kind} {struct}, {path}));')
    for name, _ in constants():
        lines.append(f'printf("const {name} %llu\\n", (unsigned long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_figures(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("abi")
    source, binary = workdir / "abi.c", workdir / "abi"
    source.write_text(c_program())
    build = subprocess.run(["gcc", "-o", str(binary), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    figures = {}
    for line in output.splitlines():
        kind, name, value = line.split()
        figures[(kind, name)] = int(value)
    return figures


def python_figures():
    figures = {}
    for struct in top_level_structs():
        cls = getattr(structs, struct)
        figures[("sizeof", struct)] = ctypes.sizeof(cls)
        for path, offset, size in field_paths(cls):
            figures[("offsetof", f"{struct}.{path}")] = offset
            figures[("sizeof", f"{struct}.{path}")] = size
    for name, value in constants():
        figures[("const", name)] = value
    return figures


def test_every_struct_size_offset_and_constant_matches_the_kernel_header(c_figures):
    ours = python_figures()
    assert set(ours) == set(c_figures)
    mismatches = {key: (ours[key], c_figures[key]) for key in ours if ours[key] != c_figures[key]}
    assert not mismatches, f"pykvm vs <linux/kvm.h>: {mismatches}"


def test_the_check_covers_what_a_vmm_needs():
    declared = set(top_level_structs())
    needed = {"kvm_run", "kvm_regs", "kvm_sregs", "kvm_fpu", "kvm_msrs", "kvm_msr_entry",
              "kvm_msr_list", "kvm_cpuid2", "kvm_cpuid_entry2", "kvm_lapic_state", "kvm_irqchip",
              "kvm_pit_state2", "kvm_pit_config", "kvm_clock_data", "kvm_vcpu_events",
              "kvm_mp_state", "kvm_xcrs", "kvm_debugregs", "kvm_userspace_memory_region",
              "kvm_irq_level", "kvm_irqfd", "kvm_ioeventfd", "kvm_irq_routing", "kvm_msi",
              "kvm_guest_debug", "kvm_dirty_log"}
    assert needed <= declared
    assert len(list(constants())) > 100


def test_the_kvm_run_decode_reads_the_fields_the_checked_structs_name():
    """pykvm/ioctl/run.py's struct formats are built from the offsets checked above; a
    page filled through the ctypes struct must unpack to the same values."""
    from pykvm.ioctl import run, structs as s

    page = bytearray(ctypes.sizeof(s.kvm_run))
    kvm_run = s.kvm_run.from_buffer(page)
    kvm_run.exit_reason = 2
    kvm_run.io.direction, kvm_run.io.size, kvm_run.io.port = 1, 4, 0x3F8
    kvm_run.io.count, kvm_run.io.data_offset = 3, 4096
    assert run.EXIT_AND_IO.unpack_from(page, run.EXIT_REASON_OFFSET) == (2, 1, 4, 0x3F8, 3, 4096)
    kvm_run.mmio.phys_addr, kvm_run.mmio.len, kvm_run.mmio.is_write = 0xFEE00000, 200, 1
    kvm_run.mmio.data[:] = list(range(1, 9))
    mmio = run.mmio_exit(page)
    assert (mmio.addr, mmio.length, mmio.is_write, mmio.value) == \
        (0xFEE00000, 8, True, 0x0807060504030201)    # len clamped to the data's 8 bytes
    run.complete_mmio_read(page, mmio, 0x1122334455667788)
    assert bytes(kvm_run.mmio.data) == (0x1122334455667788).to_bytes(8, "little")
    kvm_run.internal.suberror = 1
    assert run.internal_error(kvm_run).suberror == 1
    kvm_run.immediate_exit = 0
    page[run.IMMEDIATE_EXIT_OFFSET] = 1
    assert kvm_run.immediate_exit == 1
    del kvm_run
