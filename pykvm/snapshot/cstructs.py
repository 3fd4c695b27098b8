"""ctypes structs of <linux/kvm.h> in state.json, field by field.

A struct is an object of its fields by their C names (so ``state.json`` can be read
next to the header); arrays are lists; ``c_char`` arrays (raw register pages) base64
text; padding and ``reserved`` fields are left out (they go back as zeros, which is
what KVM wants of them). Reading one back checks every field against its C type:
presence, type, range (an integer that does not fit is refused, not truncated).
The schema (schema.py) uses these for a field annotated with a struct type.
"""

from __future__ import annotations

import ctypes

from .blob import b64, unb64

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
