"""Older state.json formats, read by converting them to the current one.

A format version names one layout of state.json (document.py). When the layout
changes, the old version is either converted here, as plain JSON in and JSON out,
before the current schema checks everything, or refused by document.py with one
line that says which versions this pykvm reads. Converting never trusts the old
file more than a current one: the result goes through the same decode and checks.

Version 1 (pykvm before the typed per-component state; tests/data/snapshot-v1 is one):

* records in ``config`` named their class by module path (``"__type__":
  "pykvm.devices.virtio.attach:DiskSpec"``); version 2 names them by stable tag
  (``"tag": "disk"``). Only the two paths version 1 could write are known; anything
  else is refused. ``config.extra`` (gone from MachineConfig) must be empty.
* parts' states carried no tag: each gets the tag of what it was (a bus device by its
  name, a virtio function's device by its virtio device id).
* the i8042's keyboard was not saved (it did not exist): it is restored as a keyboard
  just powered on, with nothing queued.
* the quirks' page-fault hooks were under ``syscalls.plants`` with the displaced bytes
  in hex; version 2 has ``plants`` with base64.
"""

from __future__ import annotations

import base64

from .state import SnapshotError

V1_CONFIG_TYPES = {"pykvm.devices.virtio.attach:DiskSpec": "disk",
                   "pykvm.net.plumbing:NetSpec": "net"}
V1_DEVICE_TAGS = {"serial": "serial", "rtc": "rtc", "i8042": "i8042", "acpi-pm": "acpi-pm"}
V1_VIRTIO_DEVICE_TAGS = {2: "virtio-blk", 3: "virtio-serial"}   # virtio 1.2 5: device ids


def migrate(document: dict, version: int) -> dict:
    """``document`` (parsed JSON of format ``version``) in the current layout."""
    if version == 1:
        return from_v1(document)
    raise AssertionError(f"no migration from version {version}")   # document.py checks first


def _fail(where: str, what: str):
    raise SnapshotError(f"state.json (format version 1): {where}: {what}")


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, "expected an object")
    return value


def _tagged(value, tag: str, where: str) -> dict:
    return {"tag": tag, **_object(value, where)}


def from_v1(document: dict) -> dict:
    out = dict(document, version=2)
    out["config"] = _config(_object(document.get("config"), "config"))
    vcpus = document.get("vcpus")
    if not isinstance(vcpus, list):
        _fail("vcpus", "expected an array")
    out["vcpus"] = [_tagged(vcpu, "vcpu", f"vcpus[{index}]") for index, vcpu in enumerate(vcpus)]
    out["vm"] = _tagged(document.get("vm"), "vm", "vm")
    out["devices"] = {key: _device(key, state)
                      for key, state in _object(document.get("devices"), "devices").items()}
    if document.get("pci") is not None:
        out["pci"] = _pci(_object(document["pci"], "pci"))
    out["quirks"] = _quirks(_object(document.get("quirks"), "quirks"))
    return out


def _config(config: dict) -> dict:
    out = {}
    for name, value in config.items():
        if name == "extra":
            if value != {}:
                _fail("config.extra", "a snapshot with extra settings is not restored by "
                                      "this pykvm")
            continue
        if name in ("disks", "nets") and isinstance(value, list):
            value = [_config_record(item, f"config.{name}[{index}]")
                     for index, item in enumerate(value)]
        out[name] = value
    return out


def _config_record(item, where: str):
    item = _object(item, where)
    kind = item.get("__type__")
    tag = V1_CONFIG_TYPES.get(kind) if isinstance(kind, str) else None
    if tag is None:
        _fail(where, f"a record of type {str(kind)[:60]!r}, not one version 1 wrote")
    return {"tag": tag, **{key: value for key, value in item.items() if key != "__type__"}}


def _device(key: str, state) -> dict:
    name = key.partition("@")[0]
    tag = V1_DEVICE_TAGS.get(name)
    if tag is None:
        _fail(f"devices.{key[:40]}", "not a device version 1 saved")
    state = _tagged(state, tag, f"devices.{key[:40]}")
    if tag == "i8042":
        from ..devices.ps2_keyboard import Ps2Keyboard
        state.setdefault("xlate_break", False)
        state.setdefault("keyboard", Ps2Keyboard().save_state().to_json())
    return state


def _pci(pci: dict) -> dict:
    slots = {}
    for key, slot in _object(pci.get("slots"), "pci.slots").items():
        where = f"pci.slots.{key[:8]}"
        slot = dict(_object(slot, where))
        slot["config"] = _tagged(slot.get("config"), "pci-config", f"{where}.config")
        if slot.get("device") is not None:
            slot["device"] = _virtio_pci(_object(slot["device"], f"{where}.device"),
                                         f"{where}.device")
        slots[key] = slot
    return {"tag": "pci-bus", **pci, "slots": slots}


def _virtio_pci(function: dict, where: str) -> dict:
    out = {"tag": "virtio-pci", **function}
    out["msix"] = _tagged(function.get("msix"), "msix", f"{where}.msix")
    queues = function.get("queues")
    if not isinstance(queues, list):
        _fail(f"{where}.queues", "expected an array")
    out["queues"] = [_tagged(queue, "virtqueue", f"{where}.queues[{index}]")
                     for index, queue in enumerate(queues)]
    if function.get("device") is not None:
        tag = V1_VIRTIO_DEVICE_TAGS.get(function.get("device_id"))
        if tag is None:
            _fail(f"{where}.device", f"state of virtio device {str(function.get('device_id'))[:12]}, "
                                     f"which version 1 did not save")
        out["device"] = _tagged(function["device"], tag, f"{where}.device")
    return out


def _quirks(quirks: dict) -> dict:
    if not set(quirks) <= {"name", "syscalls"}:
        _fail("quirks", f"unknown key(s) {sorted(str(k)[:20] for k in quirks)[:4]}")
    plants = []
    saved = quirks.get("syscalls", {"plants": []})
    for index, plant in enumerate(_object(saved, "quirks.syscalls").get("plants", [])):
        where = f"quirks.syscalls.plants[{index}]"
        plant = dict(_object(plant, where))
        try:
            plant["displaced"] = base64.b64encode(bytes.fromhex(plant.get("displaced"))).decode()
        except (TypeError, ValueError):
            _fail(f"{where}.displaced", "not hex bytes")
        plants.append({"tag": "pf-hook-plant", **plant})
    return {"tag": "quirks", "name": quirks.get("name"), "plants": plants}
