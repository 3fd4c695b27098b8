"""ACPI and MP tables byte by byte, without KVM: signatures, lengths, checksums,
one processor entry per vCPU, and the pointers between tables."""

import struct

import pytest

from pykvm import layout
from pykvm.boot import acpi, mptable
from pykvm.boot.e820 import E820Type, e820_map
from pykvm.devices.acpi_pm import AcpiPm
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory


@pytest.fixture
def memory():
    with GuestMemory.anonymous(2 << 20) as mem:
        yield mem


def sums_to_zero(data: bytes) -> bool:
    return sum(data) % 256 == 0


def read_table(memory, addr):
    """(signature, revision, whole table bytes) of the SDT at ``addr``; checks its checksum."""
    signature, length, revision = struct.unpack("<4sIB", memory.read(addr, 9))
    data = memory.read(addr, length)
    assert sums_to_zero(data), f"{signature} checksum"
    assert data[10:16] == acpi.OEM_ID
    return signature, revision, data


def madt_entries(data: bytes):
    entries, offset = [], 44
    while offset < len(data):
        kind, length = data[offset], data[offset + 1]
        assert length >= 2
        entries.append((kind, data[offset:offset + length]))
        offset += length
    assert offset == len(data), "MADT entries must fill the table exactly"
    return entries


def walk_acpi(memory, rsdp_addr):
    rsdp = memory.read(rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR "
    assert sums_to_zero(rsdp[:20]) and sums_to_zero(rsdp)
    revision, rsdt_addr, length, xsdt_addr = struct.unpack_from("<BIIQ", rsdp, 15)
    assert (revision, length) == (2, 36)
    signature, _, xsdt = read_table(memory, xsdt_addr)
    assert signature == b"XSDT"
    pointers = struct.unpack(f"<{(len(xsdt) - 36) // 8}Q", xsdt[36:])
    signature, _, rsdt = read_table(memory, rsdt_addr)
    assert signature == b"RSDT"
    assert struct.unpack(f"<{(len(rsdt) - 36) // 4}I", rsdt[36:]) == pointers
    return {read_table(memory, p)[0]: read_table(memory, p)[2] for p in pointers}


@pytest.mark.parametrize("cpus", [1, 2, 8, 64, 255])
def test_acpi_tables_checksum_and_link_up(memory, cpus):
    tables = acpi.write_acpi_tables(memory, cpus)
    assert tables.rsdp == layout.ACPI_ADDR and tables.rsdp % 16 == 0
    assert tables.end <= layout.ACPI_END
    found = walk_acpi(memory, tables.rsdp)
    assert set(found) == {b"FACP", b"APIC"}

    madt = found[b"APIC"]
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert (lapic_addr, flags) == (layout.LAPIC_ADDR, 1)
    entries = madt_entries(madt)
    cpus_seen = [struct.unpack("<BBBBI", e) for kind, e in entries if kind == 0]
    assert [(uid, apic_id, f) for _, _, uid, apic_id, f in cpus_seen] == \
        [(i, i, 1) for i in range(cpus)]
    ioapics = [struct.unpack("<BBBBII", e) for kind, e in entries if kind == 1]
    assert ioapics == [(1, 12, acpi.IOAPIC_ID, 0, layout.IOAPIC_ADDR, 0)]
    overrides = {struct.unpack("<BBBBIH", e)[3]: struct.unpack("<BBBBIH", e)[4:]
                 for kind, e in entries if kind == 2}
    assert overrides[layout.ACPI_SCI_IRQ] == (layout.ACPI_SCI_IRQ, 0xD)   # level, active high
    assert 0 not in overrides   # the PIT is on GSI 0: KVM's default routing is the identity
    nmis = [struct.unpack("<BBBHB", e) for kind, e in entries if kind == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]


def test_fadt_names_the_pm_ports_facs_and_dsdt(memory):
    tables = acpi.write_acpi_tables(memory, 2)
    _, revision, fadt = read_table(memory, tables.fadt)
    assert revision == 6 and len(fadt) == 276
    facs_addr, dsdt_addr = struct.unpack_from("<II", fadt, 36)
    assert (facs_addr, dsdt_addr) == (tables.facs, tables.dsdt)
    assert struct.unpack_from("<H", fadt, 46)[0] == layout.ACPI_SCI_IRQ
    assert struct.unpack_from("<I", fadt, 48)[0] == 0              # no SMI_CMD: ACPI mode
    assert struct.unpack_from("<I", fadt, 56)[0] == layout.ACPI_PM1A_EVT_BLK
    assert struct.unpack_from("<I", fadt, 64)[0] == layout.ACPI_PM1A_CNT_BLK
    assert (fadt[88], fadt[89]) == (layout.ACPI_PM1A_EVT_LEN, layout.ACPI_PM1A_CNT_LEN)
    assert not struct.unpack_from("<I", fadt, 112)[0] & (1 << 20)  # not HW_REDUCED
    assert not struct.unpack_from("<H", fadt, 109)[0] & 0b10       # no 8042 declared...
    with_keyboard = read_table(memory, acpi.write_acpi_tables(memory, 2, keyboard=True).fadt)[2]
    assert struct.unpack_from("<H", with_keyboard, 109)[0] & 0b10  # ...unless asked
    assert tables.facs % 64 == 0
    facs = memory.read(tables.facs, 64)
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    ports = set(range(layout.ACPI_PM_BASE, layout.ACPI_PM_BASE + layout.ACPI_PM_LEN))
    assert {layout.ACPI_PM1A_EVT_BLK + i for i in range(4)} <= ports
    assert {layout.ACPI_PM1A_CNT_BLK + i for i in range(2)} <= ports


def test_dsdt_starts_with_the_s5_package(memory):
    tables = acpi.write_acpi_tables(memory, 1)
    signature, revision, dsdt = read_table(memory, tables.dsdt)
    assert (signature, revision) == (b"DSDT", 2)
    aml = dsdt[36:]
    # Name (_S5_, Package (4) {5, 5, Zero, Zero}); the PCI root follows (test_acpi_pci.py)
    assert aml.startswith(bytes.fromhex("08 5F53355F 12 08 04 0A05 0A05 00 00"))


def test_aml_pkg_length_encodings():
    assert acpi.aml_pkg_length(7) == bytes([8])
    assert acpi.aml_pkg_length(62) == bytes([63])
    # 63 payload bytes + 2 length bytes = 65 = 0x41: lead 0x41 (1 extra, nibble 1), then 0x04
    assert acpi.aml_pkg_length(63) == bytes([0x41, 0x04])
    assert acpi.aml_pkg_length(5000)[0] >> 6 == 2


def mp_entries(table: bytes):
    count = struct.unpack_from("<H", table, 34)[0]
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    entries, offset = [], 44
    for _ in range(count):
        kind = table[offset]
        entries.append(table[offset:offset + sizes[kind]])
        offset += sizes[kind]
    assert offset == len(table)
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 8, 40, 41, 255])
def test_mp_table_checksums_and_one_processor_per_vcpu(memory, cpus):
    mp = mptable.write_mptable(memory, cpus)
    floating = memory.read(layout.MPTABLE_ADDR, 16)
    assert floating[:4] == b"_MP_" and sums_to_zero(floating)
    config_addr, length, revision = struct.unpack_from("<IBB", floating, 4)
    assert (config_addr, length, revision) == (mp.config, 1, 4)
    assert floating[11] == 0   # feature byte 1: a configuration table follows
    header = memory.read(config_addr, 44)
    assert header[:4] == b"PCMP"
    table = memory.read(config_addr, struct.unpack_from("<H", header, 4)[0])
    assert sums_to_zero(table) and table[6] == 4
    assert struct.unpack_from("<I", table, 36)[0] == layout.LAPIC_ADDR
    if cpus <= 40:
        assert config_addr + len(table) <= layout.LOW_RAM_END   # all in the EBDA's last KiB
    else:
        assert config_addr == layout.MP_CONFIG_HIGH_ADDR
    entries = mp_entries(table)
    processors = [struct.unpack("<BBBBII8s", e) for e in entries if e[0] == 0]
    assert [(p[1], p[3]) for p in processors] == [(i, 1 | (2 if i == 0 else 0)) for i in range(cpus)]
    buses = [e for e in entries if e[0] == 1]
    assert buses == [bytes([1, 0]) + b"ISA   "]
    ioapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapics == [(2, acpi.IOAPIC_ID, 0x11, 1, layout.IOAPIC_ADDR)]
    irqs = {e[5]: struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3}
    assert sorted(irqs) == [i for i in range(16) if i != 2]
    assert all(entry[6] == irq and entry[5] == acpi.IOAPIC_ID for irq, entry in irqs.items())
    assert irqs[0][2] == 0 and irqs[layout.ACPI_SCI_IRQ][2] == 0xD
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(l[1], l[5], l[6]) for l in lints] == [(3, 0, 0), (1, 0xFF, 1)]
    assert memory.read_u16(layout.BDA_EBDA_SEGMENT) << 4 == layout.EBDA_START
    assert memory.read_u16(layout.BDA_BASE_MEM_KB) == 639


def test_cpu_counts_out_of_range_are_config_errors(memory):
    for cpus in (0, 256):
        with pytest.raises(ConfigError):
            acpi.write_acpi_tables(memory, cpus)
        with pytest.raises(ConfigError):
            mptable.write_mptable(memory, cpus)


def test_e820_reserves_the_firmware_tables():
    entries = e820_map(256 << 20)
    reserved = [e for e in entries if e.type == E820Type.RESERVED]
    def covered(start, end):
        return any(e.addr <= start and end <= e.end for e in reserved)
    assert covered(layout.MPTABLE_ADDR, layout.LOW_RAM_END)
    assert covered(layout.ACPI_ADDR, layout.ACPI_END)
    assert covered(layout.MP_CONFIG_HIGH_ADDR, 1 << 20)
    ram = [e for e in entries if e.type == E820Type.RAM]
    assert not any(e.addr < layout.ACPI_END and layout.MPTABLE_ADDR < e.end for e in ram)


# --- the PM1a registers the FADT names ----------------------------------------------------
def test_pm_poweroff_on_s5_write_only():
    calls = []
    pm = AcpiPm(on_poweroff=lambda: calls.append("off"))
    assert pm.read(4, 2) & 1 == 1             # SCI_EN: already in ACPI mode
    pm.write(4, 2, acpi.S5_SLP_TYP << 10)      # SLP_TYP alone: nothing yet (Linux writes it first)
    assert calls == []
    pm.write(4, 2, (acpi.S5_SLP_TYP << 10) | (1 << 13))
    assert calls == ["off"]
    assert pm.read(4, 2) & (1 << 13) == 0      # SLP_EN reads as 0


def test_pm_other_sleep_states_wake_at_once_and_status_clears_by_writing_ones():
    calls = []
    pm = AcpiPm(on_poweroff=lambda: calls.append("off"))
    pm.write(5, 1, (1 << 2) | (1 << 5))        # high byte alone: SLP_TYP 1, SLP_EN
    assert calls == [] and pm.sleeps == [1]
    assert pm.read(0, 2) & 0x8000              # WAK_STS
    assert pm.read(0, 4) >> 16 == 0            # 32-bit read of the event block: enable is 0
    pm.write(2, 2, 0x0120)
    assert pm.read(2, 2) == 0x0120
    pm.write(0, 2, 0x8000)
    assert pm.read(0, 2) == 0
    assert pm.read(6, 2) == 0
