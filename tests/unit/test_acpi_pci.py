"""The DSDT's PCI root bridge, decoded: a small AML reader of the test's own (the
subset acpi.py emits, ACPI 6.4 section 20) turns the table back into a namespace, and
the _PRT is checked against what pykvm's PCI bus really wires. `iasl -d` (acpica-tools)
cross-checks the bytes when it is installed."""

import shutil
import struct
import subprocess
from dataclasses import dataclass, field

import pytest

from pykvm import layout
from pykvm.boot import acpi, aml
from pykvm.devices.pci.bus import PciBus
from pykvm.devices.pci.config import INTERRUPT_LINE, INTERRUPT_PIN, INTX_PIN_A
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.rng import RngDevice

from ..kvm.test_pci import Probe, stand_in  # noqa: F401 (a fixture: a VM without KVM)


# --- a reader for the AML subset ------------------------------------------------------------
@dataclass
class Scope:
    names: dict = field(default_factory=dict)      # NameSeg -> value, Scope or Device


@dataclass
class Buffer:
    data: bytes


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def take(self, count: int) -> bytes:
        assert self.pos + count <= len(self.data), "AML runs past its enclosing object"
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def pkg_end(self) -> int:
        """Decode a PkgLength (20.2.4); return where the package ends."""
        start = self.pos
        lead = self.byte()
        extra = lead >> 6
        if extra == 0:
            length = lead & 0x3F
        else:
            assert not lead & 0x30, "bits 5:4 of a multi-byte PkgLength are reserved"
            length = lead & 0x0F | int.from_bytes(self.take(extra), "little") << 4
        end = start + length
        assert end <= len(self.data)
        return end

    def name_string(self) -> str:
        prefix = "\\" if self.data[self.pos] == 0x5C else ""
        self.pos += len(prefix)
        return prefix + self.take(4).decode("ascii")

    def data_object(self):
        op = self.byte()
        if op in (0x00, 0x01):
            return op
        if op in (0x0A, 0x0B, 0x0C, 0x0E):
            return int.from_bytes(self.take({0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]), "little")
        if op == 0x12:                                  # PackageOp
            end = self.pkg_end()
            count = self.byte()
            elements = []
            while self.pos < end:
                elements.append(self.data_object())
            assert self.pos == end and len(elements) == count
            return elements
        if op == 0x11:                                  # BufferOp
            end = self.pkg_end()
            size = self.data_object()
            data = self.take(end - self.pos)
            assert len(data) == size
            return Buffer(data)
        raise AssertionError(f"unexpected data object opcode {op:#x} at {self.pos - 1}")

    def term_list(self, end: int, scope: Scope) -> Scope:
        while self.pos < end:
            op = self.byte()
            if op == 0x08:                              # NameOp
                name = self.name_string()
                scope.names[name] = self.data_object()
            elif op == 0x10 or (op == 0x5B and self.byte() == 0x82):   # Scope, Device
                inner_end = self.pkg_end()
                name = self.name_string()
                scope.names[name] = self.term_list(inner_end, Scope())
            else:
                raise AssertionError(f"unexpected term opcode {op:#x}")
        assert self.pos == end, "a term ran past its scope"
        return scope


def parse_dsdt(table: bytes) -> Scope:
    signature, length = struct.unpack_from("<4sI", table)
    assert (signature, length) == (b"DSDT", len(table))
    assert sum(table) % 256 == 0
    reader = Reader(table)
    reader.pos = acpi.HEADER_SIZE
    return reader.term_list(len(table), Scope())


def resources(buffer: Buffer) -> list[tuple]:
    """Descriptors of a ResourceTemplate (6.4): (kind, fields...), ending at the end tag."""
    data, pos, found = buffer.data, 0, []
    while True:
        tag = data[pos]
        if tag == 0x79:                                 # end tag, 1 byte of checksum
            assert pos + 2 == len(data), "bytes after the end tag"
            return found
        if tag == 0x47:                                 # I/O port, 7 bytes
            decode, low, high, align, length = struct.unpack_from("<BHHBB", data, pos + 1)
            found.append(("io", decode, low, high, align, length))
            pos += 8
        elif tag in (0x87, 0x88):                       # DWord / Word address space
            (size,) = struct.unpack_from("<H", data, pos + 1)
            kind, general, specific = data[pos + 3:pos + 6]
            fmt = "<5I" if tag == 0x87 else "<5H"
            gran, low, high, offset, length = struct.unpack_from(fmt, data, pos + 6)
            assert size == 3 + struct.calcsize(fmt)
            assert (gran, offset, length) == (0, 0, high - low + 1)
            found.append(({0: "memory", 1: "io", 2: "bus"}[kind], general, specific, low, high))
            pos += 3 + size
        else:
            raise AssertionError(f"unexpected resource descriptor {tag:#x}")


def decode_eisa_id(value: int) -> str:
    raw = value.to_bytes(4, "little")
    number = int.from_bytes(raw, "big")
    letters = "".join(chr(0x40 + (number >> shift & 0x1F)) for shift in (26, 21, 16))
    return f"{letters}{number & 0xFFFF:04X}"


@pytest.fixture(scope="module")
def namespace() -> Scope:
    return parse_dsdt(acpi.dsdt())


@pytest.fixture
def pci0(namespace) -> Scope:
    return namespace.names["\\_SB_"].names["PCI0"]


# --- the checks -----------------------------------------------------------------------------
def test_dsdt_keeps_s5_and_declares_a_pci_root_bridge(namespace, pci0):
    assert namespace.names["_S5_"] == [acpi.S5_SLP_TYP, acpi.S5_SLP_TYP, 0, 0]
    assert decode_eisa_id(pci0.names["_HID"]) == "PNP0A03"
    assert (pci0.names["_SEG"], pci0.names["_BBN"], pci0.names["_UID"]) == (0, 0, 0)
    assert set(pci0.names) == {"_HID", "_SEG", "_BBN", "_UID", "_CRS", "_PRT"}


def test_crs_claims_bus_0_conf1_and_forwards_the_rest(pci0):
    producer = aml.ADDRESS_PRODUCER_FIXED
    assert resources(pci0.names["_CRS"]) == [
        ("bus", producer, 0, 0, 0),
        ("io", 1, 0xCF8, 0xCF8, 1, 8),
        ("io", producer, aml.IO_RANGE_ENTIRE, 0, 0xCF7),
        ("io", producer, aml.IO_RANGE_ENTIRE, 0xD00, 0xFFFF),
        ("memory", producer, aml.MEMORY_READ_WRITE, layout.PCI_MMIO_START,
         layout.PCI_MMIO_START + layout.PCI_MMIO_SIZE - 1),
    ]


def test_prt_matches_the_wiring_of_a_full_bus(stand_in, pci0):
    """Fill bus 0: a real virtio-pci function and pin-A probes. Every device's pin A must
    have a _PRT entry naming the GSI the bus raises (and writes to Interrupt Line), and
    every BAR the bus places must lie in the bridge's memory window."""
    prt = {}
    for address, pin, source, gsi in pci0.names["_PRT"]:
        assert address & 0xFFFF == 0xFFFF and source == 0
        assert (address >> 16, pin) not in prt
        prt[(address >> 16, pin)] = gsi
    window = [r for r in resources(pci0.names["_CRS"]) if r[0] == "memory"][0]
    bus = PciBus(stand_in)
    rng = VirtioPciDevice(stand_in, stand_in.memory, RngDevice())
    assert rng.config.get(INTERRUPT_PIN, 1) == INTX_PIN_A   # pykvm's functions use pin A
    probes = [Probe() for _ in range(layout.PCI_SLOTS - 2)]
    for probe in probes:
        probe.config.set(INTERRUPT_PIN, 1, INTX_PIN_A)
    for device in [rng] + probes:       # the stand-in VM closes the bus and them
        slot = bus.add(device)
        gsi = device.config.get(INTERRUPT_LINE, 1)
        assert prt[(slot, 0)] == gsi, f"slot {slot}"
        device.intx.set_level(True)
        assert stand_in.lines[gsi].level            # the line the _PRT names is the one raised
        device.intx.set_level(False)
        for index in device.bar_devices:
            address = bus.bar_address(slot, index)
            assert window[3] <= address and address + device.config.bars[index].size - 1 <= window[4]
    assert slot == layout.PCI_SLOTS - 1
    assert {pin for _, pin in prt} == {0}               # no route for pins B-D: none is used
    assert {slot for slot, _ in prt} == set(range(layout.PCI_SLOTS))


def test_prt_gsis_are_level_triggered_in_the_madt():
    """A _PRT GSI is level-triggered (6.2.13); the MADT's overrides must agree, or the
    guest programs an edge pin for a line pykvm holds."""
    gsis = {gsi for gsi in layout.PCI_INTX_GSI_BY_SLOT}
    assert gsis <= set(acpi.level_triggered_irqs())
    assert layout.ACPI_SCI_IRQ not in gsis


def test_aml_encodings():
    assert aml.eisa_id("PNP0A03") == bytes.fromhex("0C 41D00A03")
    assert aml.integer(0x1234) == bytes.fromhex("0B 3412")
    assert aml.integer(0x12345) == bytes.fromhex("0C 45230100")
    with pytest.raises(ValueError):
        aml.name_seg("pci0")
    # Device (PCI0) is far over 63 bytes: a two-byte PkgLength the reader must round-trip.
    body = bytes(300)
    reader = Reader(aml.pkg_length(len(body)) + body)
    assert reader.pkg_end() == len(reader.data)


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_iasl_disassembles_the_dsdt_cleanly(tmp_path):
    (tmp_path / "dsdt.dat").write_bytes(acpi.dsdt())
    result = subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "dsdt.dsl").read_text()
    for expected in ('Name (_S5, Package (0x04)', "Scope (\\_SB)", "Device (PCI0)",
                     'EisaId ("PNP0A03")', "WordBusNumber (ResourceProducer",
                     "0x00000D00,         // Range Minimum", "0xCFFFFFFF,         // Range Maximum",
                     "Name (_PRT, Package (0x20)", "0x0001FFFF,"):
        assert expected in text, expected
