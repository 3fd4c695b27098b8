"""The machine's configuration in state.json (the ``config`` record).

Saved as given, every MachineConfig field by name; paths absolute (a restore works
from anywhere). The records a config's lists hold are saved with a stable tag
(CONFIG_RECORDS: ``"tag": "disk"``), never their module path, and only those kinds
are ever read back. Reading checks every field against its annotation (schema.py's
rules), each record must be what the command line could give (written back as its
option text and parsed again, it comes out the same), and
:meth:`MachineConfig.validate` runs as for a command line. A list field this code has
no rule for (a device kind added later, live shares) restores only empty: a host
resource nobody checks or confirms is refused.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

from ..net.mac import format_mac
from .schema import decode
from .state import SnapshotError

if typing.TYPE_CHECKING:
    from ..machine import MachineConfig

MAX_CONFIG_ITEMS = 64
MAX_BYTES_TEXT = 64          # a saved bytes value (a MAC: 17 characters)


def encode_config(config) -> dict:
    """MachineConfig as given (paths made absolute, so a restore works from anywhere)."""
    from ..machine import MachineConfig

    out = {}
    for field in dataclasses.fields(MachineConfig):
        value = getattr(config, field.name)
        if field.name == "disks":
            value = [dataclasses.replace(d, path=os.path.abspath(d.path))
                     if hasattr(d, "path") else d for d in value]
        elif isinstance(value, Path):
            value = str(value.absolute())
        out[field.name] = _encode(value)
    return out


def decode_config(data) -> MachineConfig:
    """The ``config`` of state.json as a MachineConfig, every field checked against its
    annotation (pykvm/snapshot/schema.py's rules): records only of the kinds a config
    holds (CONFIG_RECORDS; no other type named by the file is ever looked up), and
    :meth:`MachineConfig.validate` as for a command line. SnapshotError if not."""
    from ..errors import ConfigError
    from ..machine import MachineConfig

    config = _decode_record(MachineConfig, data, "config")
    try:
        config.validate()
    except ConfigError as error:
        raise SnapshotError(f"state.json: config: {error}") from None
    return config


def config_records() -> dict:
    """The records a MachineConfig's lists hold, by their tag in state.json."""
    from ..machine.config import DiskSpec, NetSpec

    return {"disk": DiskSpec, "net": NetSpec}


CONFIG_LISTS = {"disks": "DiskSpec", "nets": "NetSpec", "shares": str}


def _decode_record(kind, data, where: str):
    if not isinstance(data, dict):
        raise SnapshotError(f"state.json: {where}: expected an object")
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known - {"tag"})
    if unknown:
        raise SnapshotError(f"state.json: {where}: this pykvm does not know "
                            f"{', '.join(str(u)[:40] for u in unknown[:3])} (a snapshot of a "
                            f"newer pykvm?)")
    hints = typing.get_type_hints(kind, localns={"FsSpec": _LiveShare})
    values = {name: _decode_field(kind, name, hints[name], raw, f"{where}.{name}")
              for name, raw in data.items() if name != "tag"}
    try:
        return kind(**values)
    except (TypeError, ValueError) as error:
        raise SnapshotError(f"state.json: {where}: {error}") from None


class _LiveShare:
    """What MachineConfig's ``live_shares: list[FsSpec]`` names, for reading its hint: a
    VM with a live share is never saved, and its list is read as any list this module
    has no rule for (restored only empty), so the hint's "a list" is all that is used.
    The real FsSpec would import virtio-fs and vhost-user into every restore (~10 ms,
    bench/startup.py --restore)."""


def _decode_field(kind, name: str, hint, raw, where: str):
    from ..machine import MachineConfig

    if kind is MachineConfig and name in CONFIG_LISTS:
        if not isinstance(raw, list) or len(raw) > MAX_CONFIG_ITEMS:
            raise SnapshotError(f"state.json: {where}: expected a list (at most "
                                f"{MAX_CONFIG_ITEMS} items)")
        return [_decode_item(CONFIG_LISTS[name], item, f"{where}[{index}]")
                for index, item in enumerate(raw)]
    if hint is tuple and raw == []:
        # NetSpec.forwards of a TAP NIC: JSON has no tuples (a user NIC's are refused below)
        return ()
    if hint in (list, dict) or typing.get_origin(hint) is list:
        # A kind of device this module does not know how to check (nor confirm as a
        # host resource, resources.py): restored only if the snapshot has none of them.
        empty = [] if typing.get_origin(hint) is list else hint()
        if raw != empty:
            raise SnapshotError(f"state.json: {where}: a snapshot with {name} is not "
                                f"restored by this pykvm")
        return empty
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                   types.UnionType) else (hint,)
    if raw is None and type(None) in options:
        return None
    for option in options:
        if option is Path and isinstance(raw, str):
            return Path(decode(str, raw, where))
        if option in (bool, int, str) and type(raw) is option:
            return decode(option, raw, where)
        if option is bytes and isinstance(raw, str) and len(raw) <= MAX_BYTES_TEXT:
            try:                        # a NIC's MAC: _encode's colon-separated hex
                return bytes.fromhex(raw.replace(":", ""))
            except ValueError:
                break
    raise SnapshotError(f"state.json: {where}: {str(raw)[:40]!r} is not a "
                        f"{' or '.join(getattr(o, '__name__', str(o)) for o in options)}")


def _decode_item(kind, raw, where: str):
    if kind is str:
        return decode(str, raw, where)
    records = config_records()
    tag = raw.get("tag") if isinstance(raw, dict) else None
    record = records.get(tag) if isinstance(tag, str) else None
    if record is None or record.__name__ != kind:
        raise SnapshotError(f"state.json: {where}: expected a {kind} record")
    return _as_from_command_line(_decode_record(record, raw, where), where)


def _as_from_command_line(spec, where: str):
    """``spec`` if the command line could have given it: written back as its option
    text (``--disk``, ``--net``) and parsed by the same code, it comes out the same.
    So a snapshot holds no disk serial, TAP or namespace name the option would refuse."""
    from ..errors import ConfigError

    if type(spec).__name__ == "DiskSpec":
        text = spec.option_text()
    else:
        text = ",".join([f"tap={spec.tap}" if spec.tap else "tap"]
                        + [f"{key}={value}" for key, value in (("bridge", spec.bridge),
                                                               ("netns", spec.netns)) if value]
                        + ([f"mac={format_mac(spec.mac)}"] if spec.mac is not None else []))
    try:
        parsed = type(spec).parse(text)
    except ConfigError as error:
        raise SnapshotError(f"state.json: {where}: {error}") from None
    if parsed != spec:
        raise SnapshotError(f"state.json: {where}: not what the command line could give "
                            f"({text[:60]!r})")
    return spec


def _encode(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):        # a NIC's MAC (NetSpec.mac); decoded by _decode_field
        return format_mac(value) if len(value) == 6 else value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        tags = {record: tag for tag, record in config_records().items()}
        return {"tag": tags[kind],
                **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SnapshotError(f"configuration value {value!r} cannot be saved in a snapshot")
