"""The x86-64 registers gdb sees, and their bytes in ``g``/``G``/``p``/``P`` packets.

GDB manual, "Target Descriptions" (Appendix G) and "Standard Target Features"
(G.5, i386 features): the layout is gdb's amd64 one, sent to gdb as target.xml
through ``qXfer:features:read`` ("General Query Packets"), so gdb never guesses the
register numbers. ``org.gnu.gdb.i386.core``/``.sse``/``.segments`` are gdb's own
features; ``org.pykvm.x86.system`` adds cr0, cr2, cr3, cr4 and efer, read-only
(``$cr3`` in gdb), because debugging a kernel or a tutorial guest needs them.
Values travel little-endian, ``bits // 8`` bytes each ("Packets": ``g``).

Each :class:`Register` reads from the three KVM structures (kvm_regs, kvm_sregs,
kvm_fpu) and says where a write goes; registers with no ``set`` are read-only.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass


def _gpr(name):
    return (lambda r, s, f: getattr(r, name)), ("regs", name)


def _seg(name):
    return (lambda r, s, f: getattr(s, name).selector), None


def _fpu_bytes(getter):
    return getter, None


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _full_tag(ftwx: int, fpu) -> int:
    """fxsave's abridged tag byte -> the x87 tag word gdb shows (valid or empty)."""
    return sum((0 if ftwx >> i & 1 else 3) << (2 * i) for i in range(8))


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str
    get: object                   # (regs, sregs, fpu) -> int or bytes
    set: tuple | None = None      # ("regs", field) / ("fpu", field[, index]); None: read-only
    group: str | None = None


def _registers() -> list[Register]:
    core, sse, seg, sys_ = ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                            "org.gnu.gdb.i386.segments", "org.pykvm.x86.system")
    regs = []
    for name in _GPRS:
        kind = "data_ptr" if name in ("rbp", "rsp") else "int64"
        regs.append(Register(name, 64, kind, core, *_gpr(name)))
    regs.append(Register("rip", 64, "code_ptr", core, *_gpr("rip")))
    regs.append(Register("eflags", 32, "i386_eflags", core, lambda r, s, f: r.rflags,
                         ("regs", "rflags")))
    for name in ("cs", "ss", "ds", "es", "fs", "gs"):
        regs.append(Register(name, 32, "int32", core, *_seg(name)))
    for i in range(8):
        regs.append(Register(f"st{i}", 80, "i387_ext", core,
                             lambda r, s, f, i=i: bytes(f.fpr[i])[:10], ("fpu", "fpr", i)))
    x87 = [("fctrl", lambda r, s, f: f.fcw, ("fpu", "fcw")),
           ("fstat", lambda r, s, f: f.fsw, ("fpu", "fsw")),
           ("ftag", lambda r, s, f: _full_tag(f.ftwx, f), None),
           ("fiseg", lambda r, s, f: 0, None),
           ("fioff", lambda r, s, f: f.last_ip & 0xFFFFFFFF, None),
           ("foseg", lambda r, s, f: 0, None),
           ("fooff", lambda r, s, f: f.last_dp & 0xFFFFFFFF, None),
           ("fop", lambda r, s, f: f.last_opcode, ("fpu", "last_opcode"))]
    for name, get, setter in x87:
        regs.append(Register(name, 32, "int", core, get, setter, "float"))
    for i in range(16):
        regs.append(Register(f"xmm{i}", 128, "vec128", sse,
                             lambda r, s, f, i=i: bytes(f.xmm[i]), ("fpu", "xmm", i)))
    regs.append(Register("mxcsr", 32, "i386_mxcsr", sse, lambda r, s, f: f.mxcsr,
                         ("fpu", "mxcsr"), "vector"))
    regs.append(Register("fs_base", 64, "int", seg, lambda r, s, f: s.fs.base))
    regs.append(Register("gs_base", 64, "int", seg, lambda r, s, f: s.gs.base))
    for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
        regs.append(Register(name, 64, "int64", sys_, lambda r, s, f, n=name: getattr(s, n),
                             None, "system"))
    return regs


REGISTERS = _registers()
REGISTER_INDEX = {reg.name: i for i, reg in enumerate(REGISTERS)}

_FEATURE_TYPES = {
    "org.gnu.gdb.i386.core": """
  <flags id="i386_eflags" size="4">
    <field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
    <field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
    <field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
    <field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
    <field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
    <field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
    <field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
    <field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
    <field name="ID" start="21" end="21"/>
  </flags>""",
    "org.gnu.gdb.i386.sse": """
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>
  <flags id="i386_mxcsr" size="4">
    <field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
    <field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
    <field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
    <field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
    <field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
    <field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
    <field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
  </flags>""",
}


def target_xml() -> str:
    """The target description ("Target Description Format", G.2) of :data:`REGISTERS`."""
    features: dict[str, list[str]] = {}
    for number, reg in enumerate(REGISTERS):
        group = f' group="{reg.group}"' if reg.group else ""
        features.setdefault(reg.feature, []).append(
            f'  <reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" '
            f'regnum="{number}"{group}/>')
    body = "".join(f'<feature name="{name}">{_FEATURE_TYPES.get(name, "")}\n'
                   + "\n".join(lines) + "\n</feature>\n" for name, lines in features.items())
    return ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
            '<target version="1.0">\n<architecture>i386:x86-64</architecture>\n'
            f'{body}</target>\n')


def encode(reg: Register, value) -> bytes:
    """``value`` (an int or raw bytes) as ``reg``'s bytes in a packet."""
    size = reg.bits // 8
    if isinstance(value, bytes):
        return value[:size].ljust(size, b"\0")
    return (value & ((1 << reg.bits) - 1)).to_bytes(size, "little")


def read_one(number: int, regs, sregs, fpu) -> bytes:
    reg = REGISTERS[number]
    return encode(reg, reg.get(regs, sregs, fpu))


def read_all(regs, sregs, fpu) -> bytes:
    """The ``g`` reply's bytes: every register, in order."""
    return b"".join(encode(reg, reg.get(regs, sregs, fpu)) for reg in REGISTERS)


def split_all(data: bytes) -> list[tuple[int, bytes]]:
    """A ``G`` packet's bytes as (register number, bytes); a short packet sets the
    registers it covers, as gdb's own stubs do."""
    offset, updates = 0, []
    for number, reg in enumerate(REGISTERS):
        size = reg.bits // 8
        if offset + size > len(data):
            break
        updates.append((number, data[offset:offset + size]))
        offset += size
    return updates


def store(reg: Register, value: bytes, regs, fpu) -> None:
    """Write ``value`` (a packet's bytes) into kvm_regs or kvm_fpu where ``reg`` lives."""
    where, field, *index = reg.set
    target = regs if where == "regs" else fpu
    if index:
        array = getattr(target, field)[index[0]]
        ctypes.memmove(array, value, min(len(value), ctypes.sizeof(array)))
    else:
        setattr(target, field, int.from_bytes(value, "little"))
