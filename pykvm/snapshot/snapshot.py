"""Taking a snapshot of a machine into a directory, and building a machine from one.

The directory holds two files (schema: README.md next to this file):

    state.json   every part's typed state (state.py: the protocol), the machine's
                 configuration (config.py), the memory layout, and a sha256 over the
                 canonical JSON of all of it; older formats are read through migrate.py
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
import json
import os
import threading
import time
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
from .config import decode_config, encode_config
from .state import SnapshotError, Stateful, decode_for

if typing.TYPE_CHECKING:
    from ..machine import MachineConfig


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
    functions = machine.virtio.transports() if machine.virtio else []
    with contextlib.ExitStack() as stack:
        for function in functions:
            if hasattr(function, "quiesced"):
                stack.enter_context(function.quiesced())
        yield


def collect_state(machine) -> dict:
    """Every part's state (not the memory) as JSON; the VM must be paused or not yet
    started. Each part gives its typed state (state.py); this only encodes them."""
    vm = machine.vm
    with _saving("vCPUs"):
        vcpus = [vcpu.call(lambda v: v.save_state(), timeout=30).to_json() for vcpu in vm.vcpus]
    with _saving("the VM's irqchip, PIT and clock"):
        vm_state = vm.save_state().to_json()
    devices = {}
    for key, device in legacy_devices(machine).items():
        with _saving(key):
            devices[key] = device.save_state().to_json()
    pci = pci_bus(machine)
    with _saving("PCI"):
        pci_state = pci.save_state().to_json() if pci is not None else None
    from .. import __version__   # importlib.metadata: when saving, not with every restore
    return {
        "format": FORMAT, "version": VERSION, "pykvm_version": __version__,
        "host_kind": machine.kvm.host_kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": encode_config(machine.config),
        "machine": {"command_started": machine.console.command_started},
        "vm": vm_state, "vcpus": vcpus, "devices": devices, "pci": pci_state,
        "quirks": vm.quirks.save_state().to_json(),
    }


def pci_bus(machine):
    """The machine's PCI bus 0, or None (no virtio devices, or virtio-mmio: those sit
    on the MMIO bus and are saved with the other bus devices)."""
    return machine.virtio.pci if machine.virtio is not None else None


def legacy_devices(machine) -> dict:
    """Devices on the port-I/O and MMIO buses that keep state (:class:`Stateful`), by
    ``name@base``."""
    found, seen = {}, set()
    for bus in (machine.vm.pio_bus, machine.vm.mmio_bus):
        for mapping in bus.mappings():
            device = mapping.device
            if id(device) in seen or not isinstance(device, Stateful):
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


class MemoryCheck:
    """memory.bin's digest (verify_memory), checked on a thread of its own while the
    machine is built around the mapped RAM: hashlib releases the GIL, so on two CPUs the
    hashing (~20 ms for the default guest's 23 MiB) overlaps the building instead of
    preceding it (bench/startup.py --restore). :meth:`result` waits for it and raises
    what verify_memory raised; no vCPU runs before the builder has called it."""

    def __init__(self, directory, document: SnapshotDocument):
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._check, args=(directory, document),
                                        name="snapshot-verify", daemon=True)
        self._thread.start()

    def _check(self, directory, document: SnapshotDocument) -> None:
        try:
            verify_memory(directory, document)
        except BaseException as failure:       # handed to result()'s caller
            self._failure = failure

    def result(self) -> None:
        self._thread.join()
        if self._failure is not None:
            raise self._failure


@dataclass
class OpenedSnapshot:
    """A snapshot read, checked and confirmed, its RAM mapped: what the builder
    (pykvm/machine/builder.py) assembles a machine around and applies ``document`` to.
    The caller owns ``memory`` (the machine does, once built on it) and must wait for
    ``memory_check`` (None: not asked for) before any vCPU runs."""

    document: SnapshotDocument
    config: MachineConfig
    memory: object          # GuestMemory
    memory_check: MemoryCheck | None = None

    def verified(self) -> None:
        """Return once memory.bin's digest is checked; SnapshotError if it does not match."""
        if self.memory_check is not None:
            self.memory_check.result()


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
    check_disks(config)
    try:
        memory = GuestMemory.from_file(str(directory / MEMORY_FILE), layout)
    except (OSError, PykvmError) as error:
        raise SnapshotError(f"{directory}: cannot map {MEMORY_FILE}: {error}") from None
    return OpenedSnapshot(document, config, memory,
                          MemoryCheck(directory, document) if verify else None)


def check_disks(config) -> None:
    for disk in config.disks:
        if not os.path.exists(disk.path):
            raise SnapshotError(f"{disk.path}: disk image of the snapshot is missing")


def apply_state(machine, document: SnapshotDocument) -> None:
    """Every part's state, in the order KVM and the devices need (README.md next to this
    file); each device's and the PCI bus's decoded as the state that part restores."""
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
            device.restore_state(decode_for(device, saved[key], f"devices.{key}"))
    pci = pci_bus(machine)
    if (document.pci is None) != (pci is None):
        raise SnapshotError("state.json: PCI devices saved and present differ")
    if pci is not None:
        with _part("PCI"):
            pci.restore_state(decode_for(pci, document.pci, "pci"))
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
    """Errors of one part, as one line that names it. Only what a part says about its
    input (SnapshotError, a PykvmError such as VirtqueueError, KVM refusing a value) is
    turned into that line: any other exception is a bug in pykvm and stays one."""
    try:
        yield
    except SnapshotError as error:
        message = str(error)
        raise SnapshotError(message if message.startswith("state.json") else
                            f"state.json: {where}: {message}") from None
    except KvmError as error:
        raise SnapshotError(f"{where}: KVM refused the state: {error}") from None
    except PykvmError as error:
        raise SnapshotError(f"{where}: {str(error).strip().splitlines()[0]}") from None
