"""The Intel MultiProcessor Specification 1.4 table: the pre-ACPI way a guest
finds its processors and IOAPIC (Linux uses it with ``acpi=off``, or when built
without ACPI; ``CONFIG_X86_MPPARSE``).

What pykvm writes at ``layout.MPTABLE_ADDR`` (the first KiB of the EBDA, which
Linux scans along with the last KiB of base memory and 0xF0000-0xFFFFF):

- the 16-byte **MP floating pointer structure** ("_MP_"), pointing at
- the **configuration table** ("PCMP", right after it; in the BIOS area at
  ``layout.MP_CONFIG_HIGH_ADDR`` if it outgrows the EBDA, past ~40 vCPUs):
  one processor entry per vCPU (APIC ID = vCPU id; vCPU 0 is the bootstrap
  processor), one ISA bus, the IOAPIC, an I/O interrupt entry per ISA IRQ
  (identity-mapped to IOAPIC pins, as KVM's default GSI routing wires them;
  the SCI and PCI INTx IRQs level-triggered as in the ACPI MADT), and the two
  local interrupts: ExtINT on the BSP's LINT0, NMI on every LINT1.

The BIOS data area gets the EBDA segment (0x40E) and the base memory size
(0x413), as a BIOS leaves them. Both structures' bytes sum to 0 mod 256.
Layouts: MP spec 1.4, chapter 4 (tables 4-1 to 4-11).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .. import layout
from ..errors import ConfigError
from .acpi import INTI_LEVEL_ACTIVE_HIGH, IOAPIC_ID, check_cpus, checksum, level_triggered_irqs

SPEC_REVISION = 4                     # MP spec 1.4
FLOATING = struct.Struct("<4sIBBBBB3s")   # signature, config table address, length (16-byte
#                                          units), spec revision, checksum, feature bytes 1, 2, 3-5
FLOATING_SIZE = FLOATING.size         # 16
HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
HEADER_SIZE = HEADER.size             # 44
HEADER_CHECKSUM_OFFSET = 7
OEM_ID = b"PYKVM   "                  # 8 bytes
PRODUCT_ID = b"PYKVM VM    "          # 12 bytes

# Entry types and their encodings.
PROCESSOR = 0
BUS = 1
IOAPIC = 2
IO_INTERRUPT = 3
LOCAL_INTERRUPT = 4
PROCESSOR_ENTRY = struct.Struct("<BBBBII8s")    # 20 bytes
BUS_ENTRY = struct.Struct("<BB6s")              # 8
IOAPIC_ENTRY = struct.Struct("<BBBBI")          # 8
INTERRUPT_ENTRY = struct.Struct("<BBHBBBB")     # 8, I/O and local interrupt entries alike

CPU_ENABLED = 1
CPU_BOOTSTRAP = 2
LAPIC_VERSION = 0x14          # KVM's local APIC version register (integrated APIC)
IOAPIC_VERSION = 0x11         # KVM's IOAPIC version register
IOAPIC_ENABLED = 1
CPU_SIGNATURE = 0x600         # family 6: informational, Linux reads the CPU's own CPUID
CPU_FEATURES = (1 << 0) | (1 << 9)   # CPUID.1:EDX FPU, APIC
ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
ISA_IRQS = 16
INT_TYPE_INT = 0              # vectored interrupt, vector from the APIC redirection entry
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3           # vector from the 8259
CONFORMS = 0                  # interrupt flags: polarity and trigger conform to the bus
ALL_LOCAL_APICS = 0xFF


@dataclass(frozen=True)
class MpTable:
    floating: int       # the floating pointer's address
    config: int         # the configuration table's address
    config_length: int
    entries: int


def config_table(cpus: int, cpu_signature: int = CPU_SIGNATURE,
                 cpu_features: int = CPU_FEATURES) -> tuple[bytes, int]:
    """The configuration table (header + base entries) and its entry count."""
    check_cpus(cpus)
    entries = []
    for cpu in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
        entries.append(PROCESSOR_ENTRY.pack(PROCESSOR, cpu, LAPIC_VERSION, flags,
                                            cpu_signature, cpu_features, bytes(8)))
    entries.append(BUS_ENTRY.pack(BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    entries.append(IOAPIC_ENTRY.pack(IOAPIC, IOAPIC_ID, IOAPIC_VERSION, IOAPIC_ENABLED,
                                     layout.IOAPIC_ADDR))
    level = set(level_triggered_irqs())
    for irq in range(ISA_IRQS):
        if irq == 2:
            continue   # the PICs' cascade: nothing is wired to it
        flags = INTI_LEVEL_ACTIVE_HIGH if irq in level else CONFORMS
        # type, interrupt type, flags, source bus, source bus IRQ, IOAPIC ID, IOAPIC pin
        entries.append(INTERRUPT_ENTRY.pack(IO_INTERRUPT, INT_TYPE_INT, flags, ISA_BUS_ID, irq,
                                            IOAPIC_ID, irq))
    # type, interrupt type, flags, source bus, source IRQ, destination LAPIC ID, LINTIN#
    entries.append(INTERRUPT_ENTRY.pack(LOCAL_INTERRUPT, INT_TYPE_EXTINT, CONFORMS, ISA_BUS_ID, 0,
                                        0, 0))
    entries.append(INTERRUPT_ENTRY.pack(LOCAL_INTERRUPT, INT_TYPE_NMI, CONFORMS, ISA_BUS_ID, 0,
                                        ALL_LOCAL_APICS, 1))
    body = b"".join(entries)
    table = bytearray(HEADER.pack(b"PCMP", HEADER_SIZE + len(body), SPEC_REVISION, 0, OEM_ID,
                                  PRODUCT_ID, 0, 0, len(entries), layout.LAPIC_ADDR, 0, 0, 0))
    table += body
    table[HEADER_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table), len(entries)


def floating_pointer(config_addr: int) -> bytes:
    # Feature byte 1 = 0: a configuration table is present (no default configuration);
    # feature byte 2 = 0: no IMCR, virtual-wire mode.
    data = bytearray(FLOATING.pack(b"_MP_", config_addr, FLOATING_SIZE // 16, SPEC_REVISION,
                                   0, 0, 0, bytes(3)))
    data[10] = checksum(data)
    return bytes(data)


def write_mptable(memory, cpus: int, addr: int = layout.MPTABLE_ADDR) -> MpTable:
    """Write the floating pointer at ``addr`` and the configuration table after it."""
    table, count = config_table(cpus)
    config_addr = addr + FLOATING_SIZE
    if config_addr + len(table) > layout.LOW_RAM_END:
        config_addr = layout.MP_CONFIG_HIGH_ADDR
        if config_addr + len(table) > 1 << 20:
            raise ConfigError(f"the MP table for {cpus} vCPUs does not fit below 1 MiB")
    memory.write(addr, floating_pointer(config_addr))
    memory.write(config_addr, table)
    write_bios_data_area(memory)
    return MpTable(addr, config_addr, len(table), count)


def write_bios_data_area(memory) -> None:
    """What a BIOS leaves at 0x400: the EBDA's segment and the KiB of base memory below it."""
    memory.write_u16(layout.BDA_EBDA_SEGMENT, layout.EBDA_START >> 4)
    memory.write_u16(layout.BDA_BASE_MEM_KB, layout.EBDA_START // layout.KiB)
