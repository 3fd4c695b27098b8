"""Taking a snapshot of a machine into a directory, and building a machine from one.

The directory holds two files (schema: README.md next to this file):

    state.json   every part's save_state(), the machine's configuration, the memory
                 layout, and a sha256 over the canonical JSON of all of it
    memory.bin   guest RAM, sparse (pykvm/snapshot/memfile.py)

Both are created under temporary names relative to the directory's fd (O_EXCL,
O_NOFOLLOW: pykvm/snapshot/directory.py says what else is checked, against other
local users) and renamed into place, state.json last, so a directory never holds a
half-written snapshot under the final names, and a VM restored from a directory can
be snapshotted into that same directory (its RAM stays mapped from the old
memory.bin's inode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import KvmError, PykvmError
from ..kvm import detect_host_kind
from .directory import SnapshotDirectory
from .memfile import memory_digest, write_memory
from .state import SnapshotError

FORMAT = "pykvm-snapshot"
VERSION = 1
STATE_FILE = "state.json"
MEMORY_FILE = "memory.bin"
REQUIRED_KEYS = ("format", "version", "pykvm_version", "host_kind", "created", "checksum",
                 "memory", "config", "machine", "vm", "vcpus", "devices", "pci", "quirks")


@dataclass
class SnapshotInfo:
    """What :func:`save_snapshot` wrote."""

    path: Path
    mem_size: int           # guest RAM
    memory_bytes: int       # non-zero pages written to memory.bin
    disk_bytes: int         # memory.bin + state.json as allocated on disk
    state_bytes: int        # size of state.json
    seconds: float

    def as_dict(self) -> dict:
        return {"path": str(self.path), "mem_size": self.mem_size,
                "memory_bytes": self.memory_bytes, "disk_bytes": self.disk_bytes,
                "state_bytes": self.state_bytes, "seconds": round(self.seconds, 3)}


# --- taking a snapshot --------------------------------------------------------------------------
def save_snapshot(machine, directory) -> SnapshotInfo:
    """Snapshot ``machine`` into ``directory``: a new directory (its parent must exist),
    or one of yours holding only a previous snapshot, which is replaced (see
    :mod:`pykvm.snapshot.directory` for what is refused, and why). A running VM is
    paused for the snapshot and resumed after it; a paused one stays paused. Disk
    images are fsync'ed; they are the user's, and must not change before a restore."""
    from ..vm import State

    started = time.monotonic()
    vm = machine.vm
    if vm.stop_requested or vm.state is State.STOPPED:
        raise SnapshotError("the VM has stopped: there is nothing left to snapshot")
    with SnapshotDirectory(directory, (STATE_FILE, MEMORY_FILE)) as target:
        was_running = vm.state is State.RUNNING
        if was_running:
            vm.pause()
        try:
            with quiesced(machine):
                document = collect_state(machine)
                document["memory"] = dict(file=MEMORY_FILE, **write_memory_file(machine, target))
            target.publish(MEMORY_FILE)
            state_bytes = write_state(target, document)
        finally:
            target.discard(MEMORY_FILE)
            target.discard(STATE_FILE)
            if was_running:
                vm.resume()
        disk = document["memory"]["disk_bytes"] + target.allocated(STATE_FILE)
    return SnapshotInfo(Path(directory), machine.memory.size, document["memory"]["data_bytes"],
                        disk, state_bytes, time.monotonic() - started)


def write_memory_file(machine, target: SnapshotDirectory) -> dict:
    """Guest RAM into the snapshot's new memory file (under its temporary name)."""
    fd = target.create(MEMORY_FILE)
    try:
        return write_memory(machine.memory, fd)
    except OSError as error:
        raise SnapshotError(f"{target.path / MEMORY_FILE}: cannot write guest memory: "
                            f"{error.strerror}") from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def quiesced(machine):
    """Hold every device that moves data on threads of its own (virtio) between two
    requests, so that memory and device state agree."""
    functions = [f for _, f in machine.virtio.pci.devices()] if machine.virtio else []
    with contextlib.ExitStack() as stack:
        for function in functions:
            if hasattr(function, "quiesced"):
                stack.enter_context(function.quiesced())
        yield


def collect_state(machine) -> dict:
    """Every part's state (not the memory); the VM must be paused or not yet started."""
    vm = machine.vm
    with _saving("vCPUs"):
        vcpus = [vcpu.call(lambda v: v.save_state(), timeout=30) for vcpu in vm.vcpus]
    with _saving("the VM's irqchip, PIT and clock"):
        vm_state = vm.save_state()
    devices = {}
    for key, device in legacy_devices(machine).items():
        with _saving(key):
            devices[key] = device.save_state()
    with _saving("PCI"):
        pci = machine.virtio.pci.save_state() if machine.virtio else None
    return {
        "format": FORMAT, "version": VERSION, "pykvm_version": __version__,
        "host_kind": machine.kvm.host_kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": encode_config(machine.config),
        "machine": {"command_started": machine.console.command_started},
        "vm": vm_state, "vcpus": vcpus, "devices": devices, "pci": pci,
        "quirks": vm.quirks.save_state(),
    }


def legacy_devices(machine) -> dict:
    """Devices on the port-I/O and MMIO buses that keep state, by ``name@base``."""
    found, seen = {}, set()
    for bus in (machine.vm.pio_bus, machine.vm.mmio_bus):
        for mapping in bus.mappings():
            device = mapping.device
            if id(device) in seen or not callable(getattr(device, "save_state", None)):
                continue
            seen.add(id(device))
            found[f"{device.name}@{mapping.base:#x}"] = device
    return found


def canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode()


def checksum(document: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in document.items()
                                     if k != "checksum"})).hexdigest()


def write_state(target: SnapshotDirectory, document: dict) -> int:
    """state.json with its checksum, put in place atomically; returns its size."""
    document = dict(document, checksum="")
    document["checksum"] = checksum(document)
    data = (json.dumps(document, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    fd = target.create(STATE_FILE)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError as error:
        raise SnapshotError(f"{target.path / STATE_FILE}: cannot write: "
                            f"{error.strerror}") from None
    finally:
        os.close(fd)
    target.publish(STATE_FILE)
    return len(data)


# --- the configuration ----------------------------------------------------------------------------
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


def decode_config(data: dict):
    from ..machine import MachineConfig

    if not isinstance(data, dict):
        raise SnapshotError("state.json: config is not an object")
    return _decode_dataclass(MachineConfig, data, "config")


def _encode(value):
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        return {"__type__": f"{kind.__module__}:{kind.__qualname__}",
                **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SnapshotError(f"configuration value {value!r} cannot be saved in a snapshot")


def _decode(value, where: str):
    if isinstance(value, list):
        return [_decode(item, where) for item in value]
    if isinstance(value, dict):
        if "__type__" in value:
            module, _, name = str(value["__type__"]).partition(":")
            if not module.startswith("pykvm."):
                raise SnapshotError(f"state.json: {where}: type {value['__type__']} is not pykvm's")
            try:
                kind = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                raise SnapshotError(f"state.json: {where}: this pykvm has no {value['__type__']} "
                                    f"(a snapshot of a newer pykvm?)") from None
            if not dataclasses.is_dataclass(kind):
                raise SnapshotError(f"state.json: {where}: {value['__type__']} is not a record")
            return _decode_dataclass(kind, {k: v for k, v in value.items() if k != "__type__"},
                                     where)
        return {key: _decode(item, where) for key, item in value.items()}
    return value


def _decode_dataclass(kind, data: dict, where: str):
    known = {field.name: field for field in dataclasses.fields(kind)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SnapshotError(f"state.json: {where}: this pykvm does not know "
                            f"{', '.join(unknown)} (a snapshot of a newer pykvm?)")
    hints = typing.get_type_hints(kind)
    values = {}
    for name, raw in data.items():
        value = _decode(raw, f"{where}.{name}")
        if isinstance(value, str) and _is_path(hints.get(name)):
            value = Path(value)
        values[name] = value
    try:
        return kind(**values)
    except (TypeError, ValueError) as error:
        raise SnapshotError(f"state.json: {where}: {error}") from None


def _is_path(hint) -> bool:
    return hint is Path or Path in typing.get_args(hint)


# --- restoring ------------------------------------------------------------------------------------
def load_state(directory) -> dict:
    """state.json of ``directory``, checked: format, version, host kind, checksum, keys,
    and the memory file's presence and size. Raises SnapshotError with one line."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not directory.is_dir():
        raise SnapshotError(f"{directory}: no such snapshot directory")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SnapshotError(f"{directory}: not a pykvm snapshot (no {STATE_FILE})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SnapshotError(f"{path}: cannot read: {error}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise SnapshotError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}): "
                            f"truncated or damaged") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a pykvm snapshot (format is not {FORMAT!r})")
    if document.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot format version {document.get('version')!r}; "
                            f"this pykvm ({__version__}) reads version {VERSION} only")
    missing = [key for key in REQUIRED_KEYS if key not in document]
    if missing:
        raise SnapshotError(f"{path}: incomplete snapshot, missing {', '.join(missing)}")
    if document["checksum"] != checksum(document):
        raise SnapshotError(f"{path}: checksum mismatch: the file was changed or damaged "
                            f"after the snapshot was taken")
    host = detect_host_kind()
    if document["host_kind"] != host:
        raise SnapshotError(f"{path}: snapshot taken on a {document['host_kind']} host, this is "
                            f"a {host} host: a snapshot restores only on the same kind of KVM")
    memory = document["memory"]
    memory_path = directory / MEMORY_FILE
    try:
        size = memory_path.stat().st_size
    except FileNotFoundError:
        raise SnapshotError(f"{memory_path}: missing (the snapshot's guest memory)") from None
    if size != memory["size"]:
        raise SnapshotError(f"{memory_path}: {size} bytes, the snapshot says {memory['size']}: "
                            f"truncated or not this snapshot's memory")
    return document


def verify_memory(directory, document: dict) -> None:
    memory = document["memory"]
    regions = [(region["file_offset"], region["size"]) for region in memory["regions"]]
    if memory_digest(str(Path(directory) / MEMORY_FILE), regions) != memory["sha256"]:
        raise SnapshotError(f"{Path(directory) / MEMORY_FILE}: checksum mismatch: the guest "
                            f"memory was changed or damaged after the snapshot was taken")


def restore_machine(directory, *, stdout=None, stderr=None, stdin=None, tracer=None,
                    verify: bool = True, paused: bool = False):
    """A :class:`~pykvm.machine.Machine` in the state ``directory`` holds, ready to
    :meth:`~pykvm.machine.Machine.run` (which resumes the guest where it was; with
    ``paused`` it starts paused, for a control-socket ``resume``). ``verify`` checks the
    memory file's digest too (it reads the file's data, not its holes)."""
    from ..machine import Machine
    from ..memory import GuestMemory

    document = load_state(directory)
    if verify:
        verify_memory(directory, document)
    config = decode_config(document["config"])
    check_disks(config)
    layout = [(r["guest_addr"], r["size"], r["file_offset"]) for r in document["memory"]["regions"]]
    if sum(size for _, size, _ in layout) != config.mem_size:
        raise SnapshotError(f"{directory}: memory layout does not add up to the configured RAM")
    try:
        memory = GuestMemory.from_file(str(Path(directory) / MEMORY_FILE), layout)
    except (OSError, PykvmError) as error:
        raise SnapshotError(f"{directory}: cannot map {MEMORY_FILE}: {error}") from None
    try:
        machine = Machine(config, stdout=stdout, stderr=stderr,
                          stdin=None if config.command is not None else stdin,
                          tracer=tracer, memory=memory)
    except BaseException:
        memory.close()
        raise
    try:
        apply_state(machine, document)
        if paused:
            machine.vm.pause()
    except BaseException:
        machine.close()
        raise
    return machine


def check_disks(config) -> None:
    for disk in getattr(config, "disks", []):
        path = getattr(disk, "path", None)
        if path is not None and not os.path.exists(path):
            raise SnapshotError(f"{path}: disk image of the snapshot is missing")


def apply_state(machine, document: dict) -> None:
    vm = machine.vm
    with _part("the VM's irqchip, PIT and clock"):
        vm.restore_state(document["vm"])
    if len(document["vcpus"]) != len(vm.vcpus):
        raise SnapshotError(f"state.json: {len(document['vcpus'])} vCPU states for "
                            f"{len(vm.vcpus)} vCPUs")
    for vcpu, state in zip(vm.vcpus, document["vcpus"]):
        with _part(f"vCPU {vcpu.id}"):
            vcpu.restore_state(state)
    present = legacy_devices(machine)
    saved = document["devices"]
    if set(present) != set(saved):
        raise SnapshotError(f"state.json: devices {sorted(saved)} saved, this machine has "
                            f"{sorted(present)}")
    for key, device in present.items():
        with _part(key):
            device.restore_state(saved[key])
    if (document["pci"] is None) != (machine.virtio is None):
        raise SnapshotError("state.json: PCI devices saved and present differ")
    if machine.virtio is not None:
        with _part("PCI"):
            machine.virtio.pci.restore_state(document["pci"])
    with _part("quirks"):
        vm.quirks.restore_state(document["quirks"])
    with _part("machine"):
        if document["machine"]["command_started"]:
            machine.console.start_command()


@contextlib.contextmanager
def _saving(where: str):
    try:
        yield
    except KvmError as error:
        raise SnapshotError(f"{where}: KVM could not give its state: {error}") from None


@contextlib.contextmanager
def _part(where: str):
    """Errors of one part, as one line that names it."""
    try:
        yield
    except SnapshotError:
        raise
    except KvmError as error:
        raise SnapshotError(f"{where}: KVM refused the state: {error}") from None
    except PykvmError as error:
        raise SnapshotError(f"{where}: {str(error).strip().splitlines()[0]}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise SnapshotError(f"state.json: {where}: bad or missing value ({detail})") from None
