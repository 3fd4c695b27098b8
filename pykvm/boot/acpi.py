"""ACPI tables: how a Linux guest finds its CPUs, its interrupt controllers and
a way to power off.

What pykvm writes at ``layout.ACPI_ADDR`` (0xE0000, where an OS scans for the
RSDP on 16-byte boundaries; the zero page's ``acpi_rsdp_addr`` points there too):

    RSDP (ACPI 2.0+, 36 bytes) -> XSDT (and an RSDT for ACPI 1.0 readers)
        XSDT -> FADT ("FACP") -> FACS, DSDT
             -> MADT ("APIC")

- **MADT**: one processor-local-APIC entry per vCPU (APIC ID = vCPU id, as KVM
  sets the LAPIC ID and pykvm's CPUID reports it), the IOAPIC (GSIs 0-23),
  interrupt source overrides that make the SCI and the PCI INTx IRQs
  level-triggered, and LINT1 as NMI on every CPU.
- **FADT**: a classic (not hardware-reduced) one: the PM1a event and control
  blocks are I/O ports (``layout.ACPI_PM1A_*``) served by
  ``pykvm.devices.acpi_pm``; no SMI command port (the machine is in ACPI mode
  from the start), no PM timer, no GPE blocks, no VGA. The 8042 is declared
  (IAPC_BOOT_ARCH bit 1) only when the machine's keyboard is for the guest
  (``keyboard``: Firecracker's SendCtrlAltDel types on it): without the bit, and
  without a PNP0303 device in the DSDT, Linux's i8042 driver believes the firmware
  that there is none and skips it; with it, the controller and atkbd probes cost
  about 2% of a boot's guest time here (pykvm/devices/i8042.py answers every probe
  at once: a few hundred exits, not the minutes of polling it once took).
- **DSDT** (AML encoded by ``pykvm.boot.aml``), kept small because the guest's AML
  interpreter runs in guest ring 0, which some hosts emulate instruction by
  instruction:
  ``Name (_S5_, Package () {5, 5, 0, 0})``: Linux reads SLP_TYP for S5 from it
  and powers off by writing SLP_TYP | SLP_EN to PM1a control; and
  ``\\_SB.PCI0``, PCI bus 0 as an ACPI root bridge (PNP0A03), the way QEMU and
  Cloud Hypervisor declare theirs: its _CRS gives bus 0, the conf1 ports, every
  other port and the 32-bit BAR window; its _PRT routes pin A of each slot to the
  GSI pykvm's PCI bus raises for it (``layout.PCI_INTX_GSI_BY_SLOT``, one table
  for both). Linux then scans bus 0 from ACPI (no ``pci=`` word needed) and a
  function without MSI-X (a driver that lacks it, or ``pci=nomsi``) gets its INTx.
  A _PRT GSI is level-triggered, active low (6.2.13): Linux programs the pin so on
  first use, over the MADT override's active high; KVM's in-kernel IOAPIC ignores
  polarity, so either reading delivers the line as pykvm drives it.

Layouts: ACPI specification 6.x, sections 5.2.5 (RSDP), 5.2.6 (table header),
5.2.8 (XSDT), 5.2.9 (FADT), 5.2.10 (FACS), 5.2.12 (MADT), 6.1-6.2 and 6.4
(device objects, _PRT, resource descriptors), 20 (AML encoding).
Every table's bytes sum to 0 mod 256 (the FACS has no checksum).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout
from . import aml
from ..errors import ConfigError

OEM_ID = b"PYKVM "          # 6 bytes
OEM_TABLE_ID = b"PYKVMVM "  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"PYKV"        # 4 bytes: the "ASL compiler" that made the tables
CREATOR_REVISION = 1

HEADER = struct.Struct("<4sIBB6s8sI4sI")   # the 36-byte System Description Table header
HEADER_SIZE = HEADER.size
CHECKSUM_OFFSET = 9

# --- RSDP -------------------------------------------------------------------------------
RSDP_SIGNATURE = b"RSD PTR "
RSDP = struct.Struct("<8sB6sBIIQB3s")       # ACPI 2.0+: 36 bytes
RSDP_V1_LENGTH = 20                         # the ACPI 1.0 part the first checksum covers
RSDP_REVISION = 2                           # 2: ACPI 2.0 or later, XSDT valid

# --- FADT (revision 6, 276 bytes) ------------------------------------------------------
FADT_REVISION = 6
FADT_MINOR_REVISION = 0
FADT_LENGTH = 276
FADT_FIRMWARE_CTRL = 36     # u32 physical address of the FACS
FADT_DSDT = 40              # u32 physical address of the DSDT
FADT_PREFERRED_PM_PROFILE = 45
FADT_SCI_INT = 46           # u16: the ISA IRQ (or GSI) the SCI is wired to
FADT_SMI_CMD = 48           # u32: 0 = no SMM hand-over, the machine is in ACPI mode already
FADT_PM1A_EVT_BLK = 56      # u32 port of PM1a status (2 bytes) + enable (2 bytes)
FADT_PM1A_CNT_BLK = 64      # u32 port of PM1a control
FADT_PM_TMR_BLK = 76        # u32: 0, no PM timer (optional since ACPI 5.0A)
FADT_PM1_EVT_LEN = 88       # u8
FADT_PM1_CNT_LEN = 89       # u8
FADT_PM_TMR_LEN = 91        # u8
FADT_IAPC_BOOT_ARCH = 109   # u16
FADT_FLAGS = 112            # u32
FADT_MINOR_VERSION = 131    # u8
# Fields from offset 132 on (X_FIRMWARE_CTRL, X_DSDT, the X_ generic addresses,
# sleep registers, hypervisor id) stay 0: the OS then uses the 32-bit ones above.

# IAPC_BOOT_ARCH: bit 0 LEGACY_DEVICES, bit 1 8042, bit 2 VGA not present, bit 3 MSI
# not supported, bit 4 PCIe ASPM controls, bit 5 CMOS RTC not present.
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
# FADT flags (table 5.10).
FADT_F_WBINVD = 1 << 0        # WBINVD flushes caches correctly
FADT_F_PROC_C1 = 1 << 2       # C1 (HLT) works on every processor
FADT_F_PWR_BUTTON = 1 << 4    # the power button, if any, is a control-method device: none fixed
FADT_F_SLP_BUTTON = 1 << 5    # same for the sleep button
FADT_FLAGS_VALUE = FADT_F_WBINVD | FADT_F_PROC_C1 | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON

# --- FACS ----------------------------------------------------------------------------------
FACS_LENGTH = 64
FACS_ALIGN = 64
FACS_VERSION = 2

# --- MADT ------------------------------------------------------------------------------------
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1          # flags: the machine also has dual 8259 PICs (KVM's in-kernel PIC)
MADT_LOCAL_APIC = 0           # entry types
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_APIC_ENABLED = 1
MADT_ALL_PROCESSORS = 0xFF    # ACPI processor UID meaning "every processor"
IOAPIC_ID = 0                 # what KVM's in-kernel IOAPIC's ID register reads out of reset
IOAPIC_GSI_BASE = 0
# MPS INTI flags: bits 1:0 polarity (01 active high, 11 active low), bits 3:2 trigger
# mode (01 edge, 11 level); 0 = conforms to the bus (ISA: edge, active high).
INTI_ACTIVE_HIGH = 0b01
INTI_LEVEL = 0b11 << 2
INTI_LEVEL_ACTIVE_HIGH = INTI_LEVEL | INTI_ACTIVE_HIGH
LINT1 = 1

# --- DSDT ----------------------------------------------------------------------------------------
DSDT_REVISION = 2             # >= 2: AML integers are 64-bit
S5_SLP_TYP = 5                # the SLP_TYP value _S5_ names; pykvm.devices.acpi_pm powers off on it
PCI_CONF1_PORTS = 8           # 0xCF8-0xCFF: the root bridge's own config-mechanism ports
PCI_IO_AFTER_CONF1 = 0xD00    # the port window past them starts here, as on QEMU's pc
PCI_PRT_PIN_A = 0             # _PRT pins count from 0 (INTA); config space's Interrupt Pin from 1

XSDT_REVISION = 1
RSDT_REVISION = 1


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` plus it sum to 0 mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header, ``body``, checksum filled in."""
    table = bytearray(HEADER.pack(signature, HEADER_SIZE + len(body), revision, 0, OEM_ID,
                                  OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION))
    table += body
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def rsdp(xsdt_addr: int, rsdt_addr: int) -> bytes:
    """Root System Description Pointer, revision 2: both checksums filled in."""
    data = bytearray(RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, rsdt_addr,
                               RSDP.size, xsdt_addr, 0, b"\0\0\0"))
    data[8] = checksum(data[:RSDP_V1_LENGTH])     # ACPI 1.0 checksum: first 20 bytes
    data[32] = checksum(data)                      # extended checksum: all 36 bytes
    return bytes(data)


def xsdt(tables: list[int]) -> bytes:
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in tables))


def rsdt(tables: list[int]) -> bytes:
    return sdt(b"RSDT", RSDT_REVISION, b"".join(struct.pack("<I", a) for a in tables))


def level_triggered_irqs() -> list[int]:
    """ISA IRQs wired level-triggered, active high: the SCI and the PCI INTx lines.
    KVM's in-kernel IOAPIC takes a line's level as given (no polarity inversion)."""
    return sorted({layout.ACPI_SCI_IRQ, *layout.PCI_INTX_GSIS})


def madt(cpus: int) -> bytes:
    """Multiple APIC Description Table for ``cpus`` vCPUs with APIC IDs 0..cpus-1."""
    check_cpus(cpus)
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(cpus):
        # type, length, ACPI processor UID, APIC ID, flags
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, MADT_LOCAL_APIC_ENABLED)
    # type, length, IOAPIC ID, reserved, address, GSI base
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_ADDR,
                        IOAPIC_GSI_BASE)
    for irq in level_triggered_irqs():
        # type, length, bus (0: ISA), source IRQ, GSI, MPS INTI flags
        body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, irq, irq,
                            INTI_LEVEL_ACTIVE_HIGH)
    # type, length, processor UID, MPS INTI flags, LINT#
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, MADT_ALL_PROCESSORS, 0, LINT1)
    return sdt(b"APIC", MADT_REVISION, bytes(body))


def fadt(facs_addr: int, dsdt_addr: int, keyboard: bool = False) -> bytes:
    """Fixed ACPI Description Table: PM1a blocks at I/O ports, SCI on IRQ 9; the 8042
    declared with ``keyboard``."""
    table = bytearray(FADT_LENGTH)
    struct.pack_into("<I", table, FADT_FIRMWARE_CTRL, facs_addr)
    struct.pack_into("<I", table, FADT_DSDT, dsdt_addr)
    table[FADT_PREFERRED_PM_PROFILE] = 0          # unspecified
    struct.pack_into("<H", table, FADT_SCI_INT, layout.ACPI_SCI_IRQ)
    struct.pack_into("<I", table, FADT_SMI_CMD, 0)
    struct.pack_into("<I", table, FADT_PM1A_EVT_BLK, layout.ACPI_PM1A_EVT_BLK)
    struct.pack_into("<I", table, FADT_PM1A_CNT_BLK, layout.ACPI_PM1A_CNT_BLK)
    struct.pack_into("<I", table, FADT_PM_TMR_BLK, 0)
    table[FADT_PM1_EVT_LEN] = layout.ACPI_PM1A_EVT_LEN
    table[FADT_PM1_CNT_LEN] = layout.ACPI_PM1A_CNT_LEN
    table[FADT_PM_TMR_LEN] = 0
    struct.pack_into("<H", table, FADT_IAPC_BOOT_ARCH, IAPC_BOOT_ARCH_VGA_NOT_PRESENT |
                     (IAPC_BOOT_ARCH_8042 if keyboard else 0))
    struct.pack_into("<I", table, FADT_FLAGS, FADT_FLAGS_VALUE)
    table[FADT_MINOR_VERSION] = FADT_MINOR_REVISION
    return sdt(b"FACP", FADT_REVISION, bytes(table[HEADER_SIZE:]))


def facs() -> bytes:
    """Firmware ACPI Control Structure: no waking vector, no global lock owner. No checksum."""
    data = bytearray(FACS_LENGTH)
    struct.pack_into("<4sI", data, 0, b"FACS", FACS_LENGTH)
    data[32] = FACS_VERSION
    return bytes(data)


aml_pkg_length = aml.pkg_length     # the names the tables' tests know
aml_byte = aml.integer


def s5_package(slp_typ: int = S5_SLP_TYP) -> bytes:
    """``Name (_S5_, Package (0x04) {SLP_TYPa, SLP_TYPb, Zero, Zero})``, in AML:
        08              NameOp
        5F 53 35 5F     NameString "_S5_" (a root-scope name)
        12              PackageOp
        <PkgLength>     bytes from here to the end of the package
        04              NumElements
        0A 05 0A 05     BytePrefix SLP_TYPa, BytePrefix SLP_TYPb (PM1a and PM1b control)
        00 00           two reserved elements, ZeroOp each
    """
    return aml.name("_S5_", aml.package([aml.integer(slp_typ), aml.integer(slp_typ),
                                         aml.integer(0), aml.integer(0)]))


def pci_root_bridge() -> bytes:
    """``Scope (\\_SB) { Device (PCI0) {...} }``: PCI bus 0 as an ACPI root bridge (6.1.5
    _HID, 6.5.5 _BBN, 6.5.6 _SEG, 6.1.12 _UID, 6.2.2 _CRS, 6.2.13 _PRT), as QEMU's and Cloud
    Hypervisor's DSDTs declare it. With it Linux scans bus 0 from ACPI (no ``pci=``
    word needed) and routes INTx through the _PRT instead of finding no GSI.

    _CRS: bus 0 only; ports 0xCF8-0xCFF (conf1) consumed by the bridge itself; every
    other port forwarded; and the 32-bit BAR window (``layout.PCI_MMIO_*``) where
    pykvm's bus places every BAR (a BAR outside the windows Linux would move).
    _PRT: one entry per slot, pin A (0), source 0 (a GSI, not a link device), that
    slot's GSI from ``layout.PCI_INTX_GSI_BY_SLOT`` -- the table pykvm's bus wires.
    """
    mmio_last = layout.PCI_MMIO_START + layout.PCI_MMIO_SIZE - 1
    crs = aml.resource_template([
        aml.word_bus_number(0, 0),
        aml.io_port(layout.PCI_CONFIG_ADDRESS_PORT, PCI_CONF1_PORTS),
        aml.dword_io(0, layout.PCI_CONFIG_ADDRESS_PORT - 1),
        aml.dword_io(PCI_IO_AFTER_CONF1, 0xFFFF),
        aml.dword_memory(layout.PCI_MMIO_START, mmio_last),
    ])
    prt = aml.package([prt_entry(slot, gsi) for slot, gsi in enumerate(layout.PCI_INTX_GSI_BY_SLOT)])
    pci0 = aml.device("PCI0", b"".join([
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", crs),
        aml.name("_PRT", prt),
    ]))
    return aml.scope("\\_SB", pci0)


def prt_entry(slot: int, gsi: int, pin: int = PCI_PRT_PIN_A) -> bytes:
    """``Package () {0xSSSSFFFF, pin, Zero, gsi}`` (6.2.13): any function of device
    ``slot`` (6.1.1 _ADR, function 0xFFFF), its pin (0 = INTA), no link device, the GSI.
    A GSI named this way is level-triggered, active low and shareable."""
    return aml.package([aml.dword(slot << 16 | 0xFFFF), aml.integer(pin), aml.integer(0),
                        aml.integer(gsi)])


def dsdt(s5_slp_typ: int = S5_SLP_TYP) -> bytes:
    """The Differentiated System Description Table: \\_S5_ first, then the PCI root."""
    return sdt(b"DSDT", DSDT_REVISION, s5_package(s5_slp_typ) + pci_root_bridge())


def check_cpus(cpus: int) -> None:
    if not 1 <= cpus <= 255:
        raise ConfigError(f"{cpus} vCPUs: ACPI/MP tables describe 1 to 255 xAPIC processors")


@dataclass(frozen=True)
class AcpiTables:
    """Where each table went (guest-physical addresses); ``end`` is one past the last byte."""

    rsdp: int
    xsdt: int
    rsdt: int
    fadt: int
    facs: int
    dsdt: int
    madt: int
    end: int


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def build_acpi_tables(cpus: int, base: int = layout.ACPI_ADDR,
                      keyboard: bool = False) -> tuple[AcpiTables, bytes]:
    """Every table laid out from ``base`` (RSDP first, the FACS 64-byte aligned, the
    rest 16-byte aligned): their addresses and the bytes to copy to ``base``."""
    check_cpus(cpus)
    image = bytearray()
    addresses: dict[str, int] = {}

    def place(name: str, data: bytes, alignment: int = 16) -> int:
        offset = _align(len(image), alignment)
        image.extend(bytes(offset - len(image)))
        image.extend(data)
        addresses[name] = base + offset
        return base + offset

    image.extend(bytes(RSDP.size))      # the RSDP goes first; filled in last
    addresses["rsdp"] = base
    facs_addr = place("facs", facs(), FACS_ALIGN)
    dsdt_addr = place("dsdt", dsdt())
    fadt_addr = place("fadt", fadt(facs_addr, dsdt_addr, keyboard))
    madt_addr = place("madt", madt(cpus))
    xsdt_addr = place("xsdt", xsdt([fadt_addr, madt_addr]))
    rsdt_addr = place("rsdt", rsdt([fadt_addr, madt_addr]))
    image[0:RSDP.size] = rsdp(xsdt_addr, rsdt_addr)
    tables = AcpiTables(end=base + len(image), **addresses)
    return tables, bytes(image)


def write_acpi_tables(memory, cpus: int, base: int = layout.ACPI_ADDR,
                      keyboard: bool = False) -> AcpiTables:
    """Write the tables for ``cpus`` vCPUs into guest memory at ``base``; return where.
    The RSDP's address goes into the zero page (``boot.zeropage.set_acpi_rsdp``)."""
    tables, image = build_acpi_tables(cpus, base, keyboard)
    if base % 16 or not layout.ACPI_ADDR <= base or tables.end > layout.ACPI_END:
        raise ConfigError(f"ACPI tables at {base:#x}..{tables.end:#x} leave the BIOS area "
                          f"{layout.ACPI_ADDR:#x}..{layout.ACPI_END:#x}")
    memory.write(base, image)
    return tables
