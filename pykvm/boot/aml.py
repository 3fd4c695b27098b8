"""AML, the byte code of ACPI's definition blocks: the few terms pykvm's DSDT uses.

An OS reads the DSDT's AML into its ACPI namespace (Linux: ACPICA, in guest ring 0).
pykvm encodes it directly, as QEMU's hw/acpi/aml-build.c and Cloud Hypervisor's
acpi_tables crate do, instead of compiling ASL: the encodings below are few and each
one cites its grammar rule. ACPI specification 6.4: 19.3.4 (EisaId), 20.2 (the AML
grammar: 20.2.2 names, 20.2.3 data objects, 20.2.4 PkgLength, 20.2.5 terms),
6.4 (resource descriptors inside a ResourceTemplate buffer).
"""

from __future__ import annotations

import struct

NAME_OP = 0x08          # DefName := NameOp NameString DataRefObject
SCOPE_OP = 0x10         # DefScope := ScopeOp PkgLength NameString TermList
BUFFER_OP = 0x11        # DefBuffer := BufferOp PkgLength BufferSize ByteList
PACKAGE_OP = 0x12       # DefPackage := PackageOp PkgLength NumElements PackageElementList
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82        # DefDevice := ExtOpPrefix DeviceOp PkgLength NameString TermList
ROOT_CHAR = 0x5C        # '\'
ZERO_OP, ONE_OP = 0x00, 0x01
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E

# Resource descriptors (6.4.2 small, 6.4.3 large items).
IO_PORT_DESCRIPTOR = 0x47       # small item 0x08, 7 bytes of data
IO_DECODE_16 = 0x01             # the device decodes all 16 address bits
END_TAG = 0x79                  # small item 0x0F, 1 byte: checksum, 0 = "treat as valid"
DWORD_ADDRESS_SPACE = 0x87      # large items: 0x80 | name
WORD_ADDRESS_SPACE = 0x88
ADDRESS_SPACE_MEMORY, ADDRESS_SPACE_IO, ADDRESS_SPACE_BUS = 0, 1, 2
# General flags (6.4.3.5.1): bit 3 _MAF, bit 2 _MIF, bit 1 _DEC (0: positive decode),
# bit 0 (0: a range this bridge produces for the devices below it).
ADDRESS_PRODUCER_FIXED = 0b1100
IO_RANGE_ENTIRE = 0b11          # I/O type-specific flags: _RNG, ISA and non-ISA ranges
MEMORY_READ_WRITE = 0b1         # memory type-specific flags: _RW; _MEM 0: non-cacheable


def pkg_length(payload: int) -> bytes:
    """PkgLength (20.2.4) for ``payload`` bytes following it: the length counts its own
    encoding. One byte up to 63; then a lead byte holding the number of extra bytes in
    bits 7:6 and the low nibble, the rest of the value in the extra bytes."""
    for extra in range(4):
        total = payload + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0x0F)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {payload} bytes is too long")


def integer(value: int) -> bytes:
    """The shortest integer constant (20.2.3): ZeroOp, OneOp, or a prefixed 1/2/4/8 bytes."""
    if value in (0, 1):
        return bytes([value])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << 8 * size:
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"{value:#x} does not fit an AML integer")


def dword(value: int) -> bytes:
    """A DWordConst whatever the value (a _PRT address is one by convention)."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def name_seg(name: str) -> bytes:
    """A NameSeg (20.2.2): four characters, A-Z, 0-9 or _, padded with _."""
    seg = name.ljust(4, "_").encode("ascii")
    if len(seg) != 4 or not (seg[:1].isupper() or seg[:1] == b"_") or \
            not all(chr(c).isupper() or chr(c).isdigit() or c == 0x5F for c in seg):
        raise ValueError(f"{name!r} is not an ACPI name segment")
    return seg


def name_string(path: str) -> bytes:
    """A single NameSeg, optionally from the root (``\\_SB``)."""
    if path.startswith("\\"):
        return bytes([ROOT_CHAR]) + name_seg(path[1:])
    return name_seg(path)


def name(path: str, value: bytes) -> bytes:
    """``Name (path, value)``: value is an encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + value


def package(elements: list[bytes]) -> bytes:
    """``Package () {elements}``: each element an encoded data object."""
    if len(elements) > 0xFF:
        raise ValueError(f"a Package of {len(elements)} elements needs VarPackage")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, terms: bytes) -> bytes:
    body = name_string(path) + terms
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, terms: bytes) -> bytes:
    body = name_string(path) + terms
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def eisa_id(text: str) -> bytes:
    """``EisaId ("PNP0A03")`` (19.3.4): three letters, five bits each (A = 1), then four
    hex digits, packed big-endian into a DWordConst (PNP0A03 -> 0x030AD041)."""
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"{text!r} is not an EISA id")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(text[3:], 16)
    return dword(int.from_bytes(value.to_bytes(4, "big"), "little"))


# --- resource descriptors (6.4) -----------------------------------------------------------
def word_bus_number(first: int, last: int) -> bytes:
    """``WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last,
    0, count)`` (6.4.3.5.3)."""
    data = struct.pack("<BBB5H", ADDRESS_SPACE_BUS, ADDRESS_PRODUCER_FIXED, 0,
                       0, first, last, 0, last - first + 1)
    return struct.pack("<BH", WORD_ADDRESS_SPACE, len(data)) + data


def io_port(base: int, length: int) -> bytes:
    """``IO (Decode16, base, base, 1, length)`` (6.4.2.5): a fixed range of ports."""
    return struct.pack("<BBHHBB", IO_PORT_DESCRIPTOR, IO_DECODE_16, base, base, 1, length)


def _dword_space(space: int, type_flags: int, first: int, last: int) -> bytes:
    data = struct.pack("<BBB5I", space, ADDRESS_PRODUCER_FIXED, type_flags,
                       0, first, last, 0, last - first + 1)
    return struct.pack("<BH", DWORD_ADDRESS_SPACE, len(data)) + data


def dword_io(first: int, last: int) -> bytes:
    """``DWordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)``
    (6.4.3.5.2): a window of ports the bridge forwards."""
    return _dword_space(ADDRESS_SPACE_IO, IO_RANGE_ENTIRE, first, last)


def dword_memory(first: int, last: int) -> bytes:
    """``DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable,
    ReadWrite, ...)`` (6.4.3.5.2): a window of addresses the bridge forwards."""
    return _dword_space(ADDRESS_SPACE_MEMORY, MEMORY_READ_WRITE, first, last)


def resource_template(descriptors: list[bytes]) -> bytes:
    """``ResourceTemplate () {...}``: a buffer of descriptors closed by an end tag."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
