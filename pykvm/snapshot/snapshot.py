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
import json
import os
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ..errors import KvmError, PykvmError
from ..kvm import detect_host_kind
from .directory import SnapshotDirectory
from .document import (FORMAT, MEMORY_FILE, STATE_FILE, VERSION, SnapshotDocument, check_layout,
                       check_memory_file, checksum, read_document)
from .memfile import memory_digest, write_memory
from .resources import HostOverrides, confirm
from .schema import decode
from .state import SnapshotError

if typing.TYPE_CHECKING:
    from ..machine import MachineConfig

MAX_CONFIG_ITEMS = 64


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
    from ..vstate.vm import State

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
    from .. import __version__   # importlib.metadata: when saving, not with every restore
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
    """The records a MachineConfig's lists hold, by the ``__type__`` version 1 saved them
    as (their module paths then: a fixed table, never imported by name)."""
    from ..machine.config import DiskSpec, NetSpec

    return {"pykvm.devices.virtio.attach:DiskSpec": DiskSpec,
            "pykvm.net.plumbing:NetSpec": NetSpec}


CONFIG_LISTS = {"disks": "DiskSpec", "nets": "NetSpec", "shares": str}


def _decode_record(kind, data, where: str):
    if not isinstance(data, dict):
        raise SnapshotError(f"state.json: {where}: expected an object")
    known = {field.name for field in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known - {"__type__"})
    if unknown:
        raise SnapshotError(f"state.json: {where}: this pykvm does not know "
                            f"{', '.join(str(u)[:40] for u in unknown[:3])} (a snapshot of a "
                            f"newer pykvm?)")
    from ..devices.virtio.fs import FsSpec
    hints = typing.get_type_hints(kind, localns={"FsSpec": FsSpec})
    values = {name: _decode_field(kind, name, hints[name], raw, f"{where}.{name}")
              for name, raw in data.items() if name != "__type__"}
    try:
        return kind(**values)
    except (TypeError, ValueError) as error:
        raise SnapshotError(f"state.json: {where}: {error}") from None


def _decode_field(kind, name: str, hint, raw, where: str):
    from ..machine import MachineConfig

    if kind is MachineConfig and name in CONFIG_LISTS:
        if not isinstance(raw, list) or len(raw) > MAX_CONFIG_ITEMS:
            raise SnapshotError(f"state.json: {where}: expected a list (at most "
                                f"{MAX_CONFIG_ITEMS} items)")
        return [_decode_item(CONFIG_LISTS[name], item, f"{where}[{index}]")
                for index, item in enumerate(raw)]
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
    raise SnapshotError(f"state.json: {where}: {str(raw)[:40]!r} is not a "
                        f"{' or '.join(getattr(o, '__name__', str(o)) for o in options)}")


def _decode_item(kind, raw, where: str):
    if kind is str:
        return decode(str, raw, where)
    records = config_records()
    name = raw.get("__type__") if isinstance(raw, dict) else None
    record = records.get(name) if isinstance(name, str) else None
    if record is None or record.__name__ != kind:
        raise SnapshotError(f"state.json: {where}: expected a {kind} record")
    return _as_from_command_line(_decode_record(record, raw, where), where)


def _as_from_command_line(spec, where: str):
    """``spec`` if the command line could have given it: written back as its option
    text (``--disk``, ``--net``) and parsed by the same code, it comes out the same.
    So a snapshot holds no disk serial, TAP or namespace name the option would refuse."""
    from ..errors import ConfigError

    if type(spec).__name__ == "DiskSpec":
        text = ",".join([spec.path] + (["ro"] if spec.read_only else [])
                        + ([f"serial={spec.serial}"] if spec.serial else []))
    else:
        text = ",".join([f"tap={spec.tap}" if spec.tap else "tap"]
                        + [f"{key}={value}" for key, value in (("bridge", spec.bridge),
                                                               ("netns", spec.netns)) if value])
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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        names = {record: name for name, record in config_records().items()}
        return {"__type__": names[kind],
                **{f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SnapshotError(f"configuration value {value!r} cannot be saved in a snapshot")


# --- restoring ------------------------------------------------------------------------------------
def load_state(directory) -> SnapshotDocument:
    """state.json of ``directory``, read and checked field by field (pykvm/snapshot/
    document.py), the host kind, and the memory file's presence and size. Raises
    SnapshotError with one line."""
    directory = Path(directory)
    document = read_document(directory)
    host = detect_host_kind()
    if document.host_kind != host:
        raise SnapshotError(f"{directory / STATE_FILE}: snapshot taken on a "
                            f"{document.host_kind[:40]} host, this is a {host} host: a "
                            f"snapshot restores only on the same kind of KVM")
    check_memory_file(directory, document.memory)
    return document


def verify_memory(directory, document: SnapshotDocument) -> None:
    regions = [(region.file_offset, region.size) for region in document.memory.regions]
    if memory_digest(str(Path(directory) / MEMORY_FILE), regions) != document.memory.sha256:
        raise SnapshotError(f"{Path(directory) / MEMORY_FILE}: checksum mismatch: the guest "
                            f"memory was changed or damaged after the snapshot was taken")


@dataclass
class OpenedSnapshot:
    """A snapshot read, checked and confirmed, its RAM mapped: what the builder
    (pykvm/machine/builder.py) assembles a machine around and applies ``document`` to.
    The caller owns ``memory`` (the machine does, once built on it)."""

    document: SnapshotDocument
    config: MachineConfig
    memory: object          # GuestMemory


def open_snapshot(directory, *, verify: bool = True, trust: bool = False, disks=None,
                  nets=None, shares=None, kvm_device: str | None = None) -> OpenedSnapshot:
    """Everything a restore checks before it builds anything (README.md next to this
    file: "What a restore refuses"), then guest RAM mapped from memory.bin."""
    from ..kvm import DEFAULT_DEVICE
    from ..layout import ram_ranges
    from ..memory import GuestMemory

    directory = Path(directory)
    document = load_state(directory)
    config = decode_config(document.config)
    confirm(config, HostOverrides.of(disks, nets, shares), trust, directory)
    config.kvm_device = kvm_device or DEFAULT_DEVICE
    layout = check_layout(document.memory, ram_ranges(config.mem_size))
    if len(document.vcpus) != config.cpus:
        raise SnapshotError(f"state.json: {len(document.vcpus)} vCPU states for "
                            f"{config.cpus} vCPUs")
    if verify:
        verify_memory(directory, document)
    check_disks(config)
    try:
        memory = GuestMemory.from_file(str(directory / MEMORY_FILE), layout)
    except (OSError, PykvmError) as error:
        raise SnapshotError(f"{directory}: cannot map {MEMORY_FILE}: {error}") from None
    return OpenedSnapshot(document, config, memory)


def restore_machine(directory, **options):
    """:func:`pykvm.machine.builder.build_from_snapshot` (this module's name for it)."""
    from ..machine.builder import build_from_snapshot
    return build_from_snapshot(directory, **options)


def check_disks(config) -> None:
    for disk in config.disks:
        if not os.path.exists(disk.path):
            raise SnapshotError(f"{disk.path}: disk image of the snapshot is missing")


def apply_state(machine, document: SnapshotDocument) -> None:
    vm = machine.vm
    with _part("the VM's irqchip, PIT and clock"):
        vm.restore_state(document.vm)
    for vcpu, state in zip(vm.vcpus, document.vcpus, strict=True):
        with _part(f"vCPU {vcpu.id}"):
            vcpu.restore_state(state)
    present = legacy_devices(machine)
    saved = document.devices
    if set(present) != set(saved):
        raise SnapshotError(f"state.json: devices {sorted(k[:40] for k in saved)[:8]} saved, "
                            f"this machine has {sorted(present)}")
    for key, device in present.items():
        with _part(key):
            device.restore_state(saved[key])
    if (document.pci is None) != (machine.virtio is None):
        raise SnapshotError("state.json: PCI devices saved and present differ")
    if machine.virtio is not None:
        with _part("PCI"):
            machine.virtio.pci.restore_state(document.pci)
    with _part("quirks"):
        vm.quirks.restore_state(document.quirks)
    if document.machine.command_started:
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
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
        raise SnapshotError(f"state.json: {where}: bad or missing value ({detail})") from None
