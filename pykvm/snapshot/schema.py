"""Typed, checked records from untrusted JSON: the snapshot's schema layer.

A snapshot's ``state.json`` is input like any other file a user is handed: it may
have been written by someone else, damaged, or crafted. Every value is checked for
its type and its range *before* pykvm uses it, and every violation is one
:class:`SnapshotError` line naming where it is (``state.json: memory.regions[1].size:
...``), never a KeyError, TypeError or OverflowError from deep inside a restore.

The schema of each part is a frozen dataclass whose field annotations say what is
accepted (Firecracker's per-device ``*State`` structs with serde are the model):

    int fields       Annotated[int, Bounds(lo, hi)]  (plain ``int``: 0 .. 2**64 - 1);
                     a JSON ``true`` is not an integer
    float            a JSON number (NaN and infinities are not JSON)
    str fields       at most MAX_TEXT characters (Annotated[str, Length(n)] for more,
                     Annotated[str, Pattern(regex)] to constrain it further)
    bytes            blob(n): base64 text of at most n bytes (exact=True: exactly n)
    a ctypes struct  an object of its C fields, each checked against its C type
                     (cstructs.py)
    bool, None, X | None, tuple[X, ...] (at most MAX_ITEMS), dict[str, X] (at most
    MAX_ITEMS keys), a nested record; a ComponentState (state.py) carries its tag:
    the annotated class's, or, for the base class itself, any registered one

Keys the record does not know, and keys it needs but does not find, are refused:
a record is a version of the format (the document's ``version`` names it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

from .blob import b64, unb64
from .cstructs import struct_from_json, struct_to_json
from ..errors import SnapshotError

STATE_TAGS: dict[str, type] = {}       # every tagged state class (state.py), by its tag


class Tagged:
    """What makes a record a part's state here: its tag, registered once (the protocol
    and the base class parts use are state.py's ComponentState). A class without a tag
    of its own stands for "any registered state" where it is a field's annotation."""

    tag: ClassVar[str] = ""

    def __init_subclass__(cls, *, tag: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if tag is None:
            return
        if STATE_TAGS.get(tag, cls) is not cls:
            raise TypeError(f"state tag {tag!r} is taken by {STATE_TAGS[tag].__qualname__}")
        cls.tag = tag
        STATE_TAGS[tag] = cls

    def check(self) -> None:
        """Rules between fields; see state.py."""


MAX_TEXT = 4096
MAX_ITEMS = 4096
U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class Bounds:
    low: int = 0
    high: int = U64_MAX


@dataclass(frozen=True)
class Pattern:
    regex: str


@dataclass(frozen=True)
class Length:
    """A string's most characters, where MAX_TEXT is too few (base64 register pages)."""
    most: int


@dataclass(frozen=True)
class Blob:
    """Bytes, as base64 text: at most ``most`` (``exact``: exactly ``most``)."""
    most: int
    exact: bool = False


def blob(most: int, exact: bool = False):
    """The annotation of a bytes field of at most (or exactly) ``most`` bytes."""
    return Annotated[bytes, Blob(most, exact)]


U8 = Annotated[int, Bounds(0, 0xFF)]
U16 = Annotated[int, Bounds(0, 0xFFFF)]
U32 = Annotated[int, Bounds(0, 0xFFFF_FFFF)]
U64 = Annotated[int, Bounds(0, U64_MAX)]
Hex64 = Annotated[str, Pattern(r"[0-9a-f]{64}")]


def base64_text(size: int):
    """The annotation of base64 text of ``size`` bytes (padding included)."""
    return Annotated[str, Length(4 * -(-size // 3))]


def decode(kind, data, where: str):
    """``data`` (parsed JSON) as the record type ``kind``, checked; SnapshotError if not."""
    return _value(kind, data, where)


def _fail(where: str, what: str):
    raise SnapshotError(f"state.json: {where}: {what}" if where else f"state.json: {what}")


def _describe(value) -> str:
    if isinstance(value, (dict, list)):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value(hint, data, where: str):
    constraints = ()
    if typing.get_origin(hint) is Annotated:
        hint, *constraints = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if data is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _value(inner, data, where)
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            _fail(where, f"expected a number, got {_describe(data)}")
        return float(data)
    if hint is bytes:
        size = next((c for c in constraints if isinstance(c, Blob)), None)
        if size is None:
            raise TypeError(f"schema: {where}: bytes without blob(n)")    # a bug in a schema
        if not isinstance(data, str) or len(data) > 4 * -(-size.most // 3):
            _fail(where, f"expected base64 text of at most {size.most} bytes, got "
                         f"{_describe(data)}")
        try:
            raw = unb64(data)
        except ValueError:
            _fail(where, "not base64 text")
        if len(raw) > size.most or (size.exact and len(raw) != size.most):
            _fail(where, f"{len(raw)} bytes, {'not' if size.exact else 'more than'} "
                         f"{size.most}")
        return raw
    if isinstance(hint, type) and issubclass(hint, ctypes.Structure):
        try:
            return struct_from_json(hint, data)
        except KeyError as error:
            _fail(where, f"missing {error.args[0]}")
        except (TypeError, ValueError) as error:
            _fail(where, str(error))
    if isinstance(hint, type) and issubclass(hint, Tagged):
        return _component(hint, data, where)
    if hint is bool:
        if not isinstance(data, bool):
            _fail(where, f"expected true or false, got {_describe(data)}")
        return data
    if hint is int:
        if isinstance(data, bool) or not isinstance(data, int):
            _fail(where, f"expected an integer, got {_describe(data)}")
        bounds = next((c for c in constraints if isinstance(c, Bounds)), Bounds())
        if not bounds.low <= data <= bounds.high:
            _fail(where, f"{_describe(data)} is out of range ({bounds.low:#x} to {bounds.high:#x})")
        return data
    if hint is str:
        if not isinstance(data, str):
            _fail(where, f"expected a string, got {_describe(data)}")
        most = next((c.most for c in constraints if isinstance(c, Length)), MAX_TEXT)
        if len(data) > most:
            _fail(where, f"a string of {len(data)} characters (at most {most})")
        for pattern in (c for c in constraints if isinstance(c, Pattern)):
            if not re.fullmatch(pattern.regex, data):
                _fail(where, f"{_describe(data)} is not of the form {pattern.regex}")
        return data
    if hint is dict or origin is dict:
        if not isinstance(data, dict):
            _fail(where, f"expected an object, got {_describe(data)}")
        if len(data) > MAX_ITEMS:
            _fail(where, f"{len(data)} keys (at most {MAX_ITEMS})")
        if hint is dict:
            return data
        _, item = typing.get_args(hint)
        return {key: _value(item, value, f"{where}.{key}") for key, value in data.items()}
    if origin is tuple:
        if not isinstance(data, list):
            _fail(where, f"expected an array, got {_describe(data)}")
        if len(data) > MAX_ITEMS:
            _fail(where, f"{len(data)} items (at most {MAX_ITEMS})")
        item, _ = typing.get_args(hint)
        return tuple(_value(item, value, f"{where}[{index}]") for index, value in enumerate(data))
    if dataclasses.is_dataclass(hint):
        return _record(hint, data, where)
    raise TypeError(f"schema: {where}: no rule for {hint!r}")    # a bug in a schema


def _component(hint, data, where: str):
    """A part's state: its tag first (the annotated class's, or any registered one for
    the base class), then its record; then its own check()."""
    if not isinstance(data, dict):
        _fail(where, f"expected an object, got {_describe(data)}")
    tag = data.get("tag")
    kind = STATE_TAGS.get(tag) if isinstance(tag, str) else None
    if kind is None or not issubclass(kind, hint) or (hint.tag and kind is not hint):
        expected = f"{hint.tag!r}" if hint.tag else "a known part's tag"
        _fail(where, f"tag {_describe(tag)} is not {expected}")
    record = _record(kind, {key: value for key, value in data.items() if key != "tag"}, where)
    try:
        record.check()
    except (SnapshotError, ValueError) as error:
        _fail(where, str(error))
    return record


def _record(kind, data, where: str):
    if not isinstance(data, dict):
        _fail(where, f"expected an object, got {_describe(data)}")
    hints = typing.get_type_hints(kind, include_extras=True)
    names = [field.name for field in dataclasses.fields(kind)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        _fail(where, f"unknown key(s) {', '.join(_describe(k) for k in unknown[:3])}")
    missing = [name for name in names if name not in data]
    if missing:
        _fail(where, f"missing {', '.join(missing)}")
    prefix = f"{where}." if where else ""
    return kind(**{name: _value(hints[name], data[name], prefix + name) for name in names})


def encode(value):
    """A state (or any value a state holds) as JSON: a ComponentState as an object with
    its tag first, records as objects, bytes as base64, ctypes structs by field."""
    if isinstance(value, Tagged):
        return {"tag": value.tag, **{f.name: encode(getattr(value, f.name))
                                     for f in dataclasses.fields(value)}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b64(value)
    if isinstance(value, (ctypes.Structure, ctypes.Array)):
        return struct_to_json(value)
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): encode(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"no JSON form for a {type(value).__name__} in a state")  # a bug in a part
