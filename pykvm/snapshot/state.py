"""The state protocol, and the helpers its implementations share.

Every stateful part of a machine (a vCPU, the VM's in-kernel devices, each
device, the PCI bus, the host's quirks) implements two methods:

    save_state() -> dict          JSON-able values only: int, str, bool, None, float,
                                  lists and dicts of them; binary blobs as base64 text
    restore_state(state: dict)    put that state back, on an object built from the same
                                  configuration and not yet running

A part never writes files or knows where its state goes: the orchestration in
:mod:`pykvm.snapshot.snapshot` collects the dicts into ``state.json``.
``restore_state`` may raise KeyError, TypeError, ValueError or OverflowError on a
malformed dict; the orchestration turns those into one :class:`SnapshotError`. The
parts whose state has a typed record (pykvm/snapshot/schema.py; the vCPUs and the
VM in kvmstate.py, the document's envelope in document.py) check it before use.

ctypes structs from :mod:`pykvm.ioctl.structs` are kept field by field
(:func:`struct_to_json` / :func:`struct_from_json`), so ``state.json`` can be
read next to <linux/kvm.h>; padding and reserved fields are left out (they go
back as zeros, which is what KVM wants of them).
"""

from __future__ import annotations

import base64
import ctypes
from typing import Protocol, runtime_checkable

from ..errors import PykvmError


class SnapshotError(PykvmError):
    """A snapshot cannot be taken, or a snapshot directory cannot be restored. For the
    CLI it is bad input like a bad image or option (exit status 2): the snapshot, the
    directory or the host resources given for it are at fault, not pykvm."""

    exit_code = 2


@runtime_checkable
class Stateful(Protocol):
    def save_state(self) -> dict: ...

    def restore_state(self, state: dict) -> None: ...


def b64(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def unb64(text: str, size: int | None = None) -> bytes:
    """Decode base64 text; with ``size``, insist on exactly that many bytes."""
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {type(text).__name__}")
    data = base64.b64decode(text.encode("ascii"), validate=True)
    if size is not None and len(data) != size:
        raise ValueError(f"expected {size} bytes, got {len(data)}")
    return data


_SKIPPED = ("pad", "padding", "reserved", "pad0", "pad1", "pad2")


def _skipped(name: str) -> bool:
    return name in _SKIPPED


def struct_to_json(value):
    """A ctypes struct (or array, or scalar) as nested dicts and lists of ints.
    ``c_char`` arrays (raw register pages) become base64 text."""
    if isinstance(value, ctypes.Structure):
        out = {}
        for name, field_type in value._fields_:
            if _skipped(name):
                continue
            if issubclass(field_type, ctypes.Array) and field_type._type_ is ctypes.c_char:
                # A c_char array field reads as bytes cut at the first NUL: take them all.
                offset = getattr(type(value), name).offset
                out[name] = b64(field_type.from_buffer_copy(value, offset).raw)
            else:
                out[name] = struct_to_json(getattr(value, name))
        return out
    if isinstance(value, ctypes.Array):
        if value._type_ is ctypes.c_char:
            return b64(bytes(value))     # .value/.raw would stop or copy oddly: the bytes
        return [struct_to_json(item) for item in value]
    return value


def struct_from_json(struct_type, data):
    """The inverse of :func:`struct_to_json`: a new ``struct_type`` filled from ``data``.
    Every non-padding field must be present (KeyError otherwise)."""
    result = struct_type()
    _fill(result, data)
    return result


def _fill(target: ctypes.Structure, data: dict) -> None:
    if not isinstance(data, dict):
        raise TypeError(f"{type(target).__name__}: expected an object, got {type(data).__name__}")
    for name, field_type in target._fields_:
        if _skipped(name):
            continue
        if name not in data:
            raise KeyError(f"{type(target).__name__}.{name}")
        value = data[name]
        if issubclass(field_type, ctypes.Structure):
            _fill(getattr(target, name), value)
        elif issubclass(field_type, ctypes.Array) and field_type._type_ is ctypes.c_char:
            raw = unb64(value, ctypes.sizeof(field_type))   # the field reads as bytes: write
            offset = getattr(type(target), name).offset     # through the address instead
            ctypes.memmove(ctypes.addressof(target) + offset, raw, len(raw))
        elif issubclass(field_type, ctypes.Array):
            _fill_array(getattr(target, name), field_type, value, f"{type(target).__name__}.{name}")
        else:
            setattr(target, name, _integer(value, f"{type(target).__name__}.{name}", field_type))


def _fill_array(array, array_type, value, where: str) -> None:
    if array_type._type_ is ctypes.c_char:
        raw = unb64(value, ctypes.sizeof(array_type))
        ctypes.memmove(ctypes.addressof(array), raw, len(raw))
        return
    if not isinstance(value, list) or len(value) != array_type._length_:
        raise ValueError(f"{where}: expected a list of {array_type._length_} items")
    element = array_type._type_
    for index, item in enumerate(value):
        if issubclass(element, ctypes.Structure):
            _fill(array[index], item)
        elif issubclass(element, ctypes.Array):
            _fill_array(array[index], element, item, f"{where}[{index}]")
        else:
            array[index] = _integer(item, where, element)


def _integer(value, where: str, c_type) -> int:
    """``value`` if it is an integer that ``c_type`` holds as is: ctypes would silently
    cut 2**70 to 64 bits (or -1 to 0xff...), a crafted snapshot must not get that far."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected an integer, got {str(value)[:40]!r}")
    bits = 8 * ctypes.sizeof(c_type)
    signed = c_type(-1).value < 0
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        raise ValueError(f"{where}: {value if abs(value) < 1 << 80 else 'a huge number'} does "
                         f"not fit in {bits} bits")
    return value
