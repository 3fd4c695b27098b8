"""The strict, typed reader of Firecracker's JSON request bodies: :class:`Record`
(a frozen dataclass whose fields :func:`spec` describes), the API's one error
:class:`ApiFault` (answered 400 with ``{"fault_message": ...}``), the id check and
PATCH merging.

It reads as Firecracker's serde does (``src/api_server/swagger/firecracker.yaml``
for the shapes; ``#[serde(deny_unknown_fields)]`` on its vmm_config structs): a
field the definition does not name, a value of the wrong JSON type, or a missing
required field refuses the whole body, with serde's wording in the fault message,
because a field pykvm silently ignored would be a setting the client believes it
made. Lists and strings are bounded (MAX_LIST, MAX_PATH_LENGTH): the client is not
trusted.

Why a module of its own: pykvm/api/firecracker/resources.py holds the definitions
(MachineConfiguration, Drive, ...), and balloon.py, entropy.py, vsock.py and mmds.py
define theirs with the same reader; pykvm.api.firecracker.resources re-exports
these names for the importers that know them from there.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field

from ...errors import PykvmError

REQUIRED = object()
DESERIALIZE = "An error occurred when deserializing the json body of a request"
MAX_ID_LENGTH = 64           # Firecracker's MAX_ID_LENGTH for drive and interface ids
MAX_PATH_LENGTH = 4096       # PATH_MAX
MAX_LIST = 64                # items of a list field (network_overrides), fwd= options
_ID = re.compile(r"^[A-Za-z0-9_]+$")


class ApiFault(PykvmError):
    """A request Firecracker's API answers with 400 and ``{"fault_message": str(self)}``."""

    exit_code = 2


# --- a strict, typed reader of JSON objects ---------------------------------------------------------
def spec(kind, default=REQUIRED, choices: tuple = ()):
    """A record field: its JSON ``kind`` (a type, a record class, ``("list", Record)``,
    or ``"null"`` for a feature not implemented: only null/absent is accepted), its
    default (``REQUIRED``: the body must give it) and, for strings, the allowed values."""
    return field(default=None if default is REQUIRED else default,
                 metadata={"kind": kind, "required": default is REQUIRED, "choices": choices})


_TYPE_NAMES = {bool: "a boolean", int: "an unsigned integer", str: "a string", dict: "an object",
               list: "a list"}


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"number {value}" if len(str(value)) < 24 else "a number"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object"


class Record:
    """A request body: the dataclass fields made with :func:`spec`."""

    @classmethod
    def from_json(cls, body, where: str = "", *, partial: bool = False):
        """The record of ``body`` (a parsed JSON value); with ``partial`` the required
        fields other than ids may be absent, and only the given ones are returned, as
        a dict (PATCH bodies)."""
        values = cls._read(body, where or cls.__name__, partial)
        if partial:
            return values
        record = cls(**values)
        record.check()
        return record

    @classmethod
    def _read(cls, body, where: str, partial: bool) -> dict:
        if not isinstance(body, dict):
            raise ApiFault(f"{DESERIALIZE}: invalid type: {_json_type(body)}, expected "
                           f"struct {where}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        refuse_unknown_fields(body, fields)
        values = {}
        for name, info in fields.items():
            if name not in body:
                if info.metadata["required"] and not (partial and not name.endswith("_id")):
                    raise ApiFault(f"{DESERIALIZE}: missing field `{name}`")
                continue
            values[name] = _value(info.metadata, body[name], f"{where}.{name}", name)
        return values

    def check(self) -> None:
        """Checks across fields, and of values beyond their JSON type."""

    def to_json(self) -> dict:
        """The body as Firecracker's GET /vm/config shows it (unset optionals left out)."""
        result = {}
        for info in dataclasses.fields(self):
            value = getattr(self, info.name)
            if isinstance(value, Record):
                value = value.to_json()
            elif isinstance(value, tuple):
                value = [item.to_json() if isinstance(item, Record) else item for item in value]
            if value is not None:
                result[info.name] = value
        return result


def refuse_unknown_fields(body: dict, names) -> None:
    """serde's ``deny_unknown_fields``: a key of ``body`` not among ``names`` refuses it."""
    for name in body:
        if name not in names:
            expected = ", ".join(f"`{n}`" for n in names)
            raise ApiFault(f"{DESERIALIZE}: unknown field `{str(name)[:64]}`, expected one "
                           f"of {expected}")


def _value(metadata, raw, where: str, name: str):
    kind, choices = metadata["kind"], metadata["choices"]
    if raw is None and not metadata["required"]:
        return None
    if kind == "null":
        raise ApiFault(f"{name}: not supported by pykvm yet (give null or leave it out)")
    if isinstance(kind, tuple):           # ("list", Record)
        if not isinstance(raw, list):
            raise ApiFault(f"{DESERIALIZE}: invalid type: {_json_type(raw)}, expected a "
                           f"sequence for `{name}`")
        if len(raw) > MAX_LIST:
            raise ApiFault(f"{name}: at most {MAX_LIST} items")
        return tuple(kind[1].from_json(item, f"{where}[{i}]") for i, item in enumerate(raw))
    if isinstance(kind, type) and issubclass(kind, Record):
        return kind.from_json(raw, where)
    wrong = not isinstance(raw, kind) or (kind is int and isinstance(raw, bool))
    if kind is int and not wrong and raw < 0:
        wrong = True
    if wrong:
        raise ApiFault(f"{DESERIALIZE}: invalid type: {_json_type(raw)}, expected "
                       f"{_TYPE_NAMES[kind]} for `{name}`")
    if kind is str:
        if choices and raw not in choices:
            raise ApiFault(f"{DESERIALIZE}: unknown variant `{raw[:40]}`, expected one of "
                           f"{', '.join(f'`{c}`' for c in choices)}")
        if len(raw) > MAX_PATH_LENGTH or "\0" in raw:
            raise ApiFault(f"`{name}`: longer than {MAX_PATH_LENGTH} bytes or holds NUL")
    return raw


def check_id(value: str, what: str) -> None:
    if not value or len(value) > MAX_ID_LENGTH or not _ID.match(value):
        raise ApiFault(f"Invalid {what} ID: it must be 1 to {MAX_ID_LENGTH} characters "
                       f"of [A-Za-z0-9_]")


def path_id_matches(path_id: str, body_id: str) -> None:
    """The id in the URL and the body's must agree (Firecracker checks it too)."""
    if path_id != body_id:
        raise ApiFault(f"The id from the path [{path_id[:64]}] does not match the id from "
                       f"the body [{body_id[:64]}]!")


def patched(record: Record, body, where: str) -> Record:
    """``record`` with the fields a PATCH ``body`` gives (strictly read), checked again."""
    changes = type(record).from_json(body, where, partial=True)
    updated = dataclasses.replace(record, **changes)
    updated.check()
    return updated
