"""Guest symbols: address -> ``name+0xoffset`` for traces and the debugger.

Two sources, chosen by the file's first bytes:

- an ELF file (a ``vmlinux``, a tutorial guest's ``build/*.elf``): its
  ``.symtab`` (or ``.dynsym``), read by the small ELF reader below;
- a ``System.map`` (``nm -n`` output): one ``ADDRESS TYPE NAME`` per line.

Addresses are the ones the guest's code uses (RIP as the CPU sees it: a
virtual address in a paging guest, the offset in CS for a real-mode guest linked
at 0). Absolute and undefined symbols are left out: they are constants, not
places.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

ELF_MAGIC = b"\x7fELF"
SHT_SYMTAB = 2
SHT_DYNSYM = 11
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00          # SHN_ABS (0xfff1), SHN_COMMON (0xfff2), ...
STT_NOTYPE, STT_OBJECT, STT_FUNC = 0, 1, 2
# Preference among symbols at one address: a function over an object over a bare label.
_TYPE_RANK = {STT_FUNC: 0, STT_OBJECT: 1, STT_NOTYPE: 2}
# System.map types that name places (text, data, bss, read-only data, weak).
_MAP_TYPES = set("TtDdBbRrWwVvGgSs")


@dataclass(frozen=True)
class Symbol:
    address: int
    size: int       # 0: unknown (System.map, labels)
    name: str


class SymbolTable:
    def __init__(self, symbols: list[Symbol], source: str = ""):
        symbols = sorted(symbols, key=lambda sym: sym.address)
        self.symbols = symbols
        self._addresses = [sym.address for sym in symbols]
        self.source = source

    def __len__(self) -> int:
        return len(self.symbols)

    def lookup(self, address: int) -> tuple[Symbol, int] | None:
        """The symbol that ``address`` falls in, and the offset into it."""
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0:
            return None
        symbol = self.symbols[index]
        offset = address - symbol.address
        if symbol.size and offset >= symbol.size:
            return None  # past the end of a sized symbol: in a gap
        return symbol, offset

    def format(self, address: int) -> str:
        """``func+0x1c``, ``func``, or '' when no symbol covers ``address``."""
        found = self.lookup(address)
        if found is None:
            return ""
        symbol, offset = found
        return f"{symbol.name}+{offset:#x}" if offset else symbol.name

    def address_of(self, name: str) -> int | None:
        for symbol in self.symbols:
            if symbol.name == name:
                return symbol.address
        return None


def load(path: str | Path) -> SymbolTable:
    """Read an ELF file's symbol table or a System.map; ConfigError if neither."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"--symbols {path}: cannot read it: {error.strerror}") from None
    if data[:4] == ELF_MAGIC:
        symbols = elf_symbols(data, str(path))
    else:
        symbols = system_map_symbols(data.decode("utf-8", "replace"), str(path))
    if not symbols:
        raise ConfigError(f"--symbols {path}: no symbols found in it")
    return SymbolTable(_dedupe(symbols), str(path))


def _dedupe(ranked: list[tuple[int, Symbol]]) -> list[Symbol]:
    """One symbol per address: the best ranked, then the first seen."""
    best: dict[int, tuple[int, Symbol]] = {}
    for rank, symbol in ranked:
        held = best.get(symbol.address)
        if held is None or rank < held[0]:
            best[symbol.address] = (rank, symbol)
    return [symbol for _, symbol in best.values()]


def system_map_symbols(text: str, source: str = "System.map") -> list[tuple[int, Symbol]]:
    symbols = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise ConfigError(f"{source}:{number}: not a System.map line "
                              f"(want 'ADDRESS TYPE NAME'): {line.strip()[:60]!r}")
        address, kind, name = parts[0], parts[1], parts[2]
        try:
            value = int(address, 16)
        except ValueError:
            raise ConfigError(f"{source}:{number}: {address!r} is not a hex address") from None
        if kind in _MAP_TYPES and not _is_local_label(name):
            symbols.append((0 if kind in "Tt" else 1, Symbol(value, 0, name)))
    return symbols


def _is_local_label(name: str) -> bool:
    return not name or name.startswith((".L", "$")) or name.startswith("__crc_")


# --- a small ELF reader: section headers, then the symbol table -----------------------------
def elf_symbols(data: bytes, source: str = "ELF file") -> list[tuple[int, Symbol]]:
    if len(data) < 0x34:
        raise ConfigError(f"{source}: truncated ELF header")
    elf_class, encoding = data[4], data[5]
    if elf_class == 2 and len(data) < 0x40:     # an ELF64 header is 64 bytes, ELF32's 52
        raise ConfigError(f"{source}: truncated ELF header")
    if encoding != 1:
        raise ConfigError(f"{source}: big-endian ELF files are not supported")
    if elf_class == 2:      # ELF64
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        section = struct.Struct("<IIQQQQIIQQ")   # name type flags addr offset size link info align entsize
        sym = struct.Struct("<IBBHQQ")          # name info other shndx value size
    elif elf_class == 1:    # ELF32
        shoff, = struct.unpack_from("<I", data, 0x20)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
        section = struct.Struct("<IIIIIIIIII")
        sym = struct.Struct("<IIIBBH")          # name value size info other shndx
    else:
        raise ConfigError(f"{source}: unknown ELF class {elf_class}")
    if shnum == 0 or shentsize < section.size:
        raise ConfigError(f"{source}: the ELF file has no section headers (stripped?)")

    def section_header(index: int):
        at = shoff + index * shentsize
        if at < 0 or at + section.size > len(data):
            raise ConfigError(f"{source}: section header {index} lies outside the file")
        return section.unpack_from(data, at)

    headers = [section_header(i) for i in range(shnum)]
    tables = [h for h in headers if h[1] == SHT_SYMTAB] or [h for h in headers if h[1] == SHT_DYNSYM]
    if not tables:
        raise ConfigError(f"{source}: the ELF file has no symbol table (stripped?)")
    symbols = []
    for table in tables:
        offset, size, link, entsize = table[4], table[5], table[6], table[9] or sym.size
        if link >= shnum:
            raise ConfigError(f"{source}: symbol table links to a missing string table")
        strings_at, strings_size = headers[link][4], headers[link][5]
        strings = data[strings_at:strings_at + strings_size]
        if offset + size > len(data):
            raise ConfigError(f"{source}: the symbol table lies outside the file")
        for at in range(offset, offset + size - sym.size + 1, entsize):
            if elf_class == 2:
                name_at, info, _, shndx, value, length = sym.unpack_from(data, at)
            else:
                name_at, value, length, info, _, shndx = sym.unpack_from(data, at)
            kind = info & 0xF
            if kind not in _TYPE_RANK or shndx == SHN_UNDEF or shndx >= SHN_LORESERVE:
                continue
            end = strings.find(b"\0", name_at)
            name = strings[name_at:end if end >= 0 else len(strings)].decode("utf-8", "replace")
            if _is_local_label(name):
                continue
            symbols.append((_TYPE_RANK[kind], Symbol(value, length, name)))
    return symbols
