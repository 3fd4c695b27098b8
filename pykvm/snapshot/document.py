"""``state.json``: reading it without trusting it, and its typed envelope (version 2).

Reading is bounded and checked before anything is used (pykvm/snapshot/schema.py):
the file must be a regular file (not a symlink, FIFO or device: a FIFO would hang the
restore), at most MAX_STATE_BYTES; JSON that Python's parser refuses for its own
limits (numbers of more than 4300 digits, nesting deeper than its recursion limit,
NaN) is damaged input like any other. Then, in this order, each with its own line:
the format, the version, the checksum, then an older version converted
(migrate.py: version 1) or refused, then every field of the envelope by the records
below (the vCPUs' and the VM's own are pykvm/vstate/kvmstate.py's), then the memory
layout against the RAM the configuration asks for. Each device's and the PCI bus's
state is decoded when it is applied, as the state that part restores (state.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..quirks import QuirksState
from ..vstate.kvmstate import VcpuState, VmState
from .migrate import migrate
from .schema import U64, Hex64, decode
from .state import SnapshotError

FORMAT = "pykvm-snapshot"
VERSION = 2                        # this layout; README.md next to this file describes it
MIGRATED = (1,)                    # older layouts read through migrate.py
STATE_FILE = "state.json"
MEMORY_FILE = "memory.bin"
MAX_STATE_BYTES = 64 << 20         # 255 vCPUs' state is a few MiB
MAX_REGIONS = 16


@dataclass(frozen=True)
class MemoryRegionState:
    guest_addr: U64
    size: U64
    file_offset: U64


@dataclass(frozen=True)
class MemoryState:
    file: str
    size: U64
    regions: tuple[MemoryRegionState, ...]
    data_bytes: U64
    disk_bytes: U64
    sha256: Hex64

    def __post_init__(self):
        if self.file != MEMORY_FILE:
            raise SnapshotError(f"state.json: memory.file: {self.file[:40]!r}, not {MEMORY_FILE}")
        if not 0 < len(self.regions) <= MAX_REGIONS:
            raise SnapshotError(f"state.json: memory.regions: {len(self.regions)} regions")


@dataclass(frozen=True)
class MachineState:
    command_started: bool


@dataclass(frozen=True)
class SnapshotDocument:
    """Everything state.json holds, checked; ``config`` is checked by config.py,
    ``devices`` and ``pci`` when applied, as the state each part restores."""

    format: str
    version: int
    pykvm_version: str
    host_kind: str
    created: str
    checksum: Hex64
    memory: MemoryState
    config: dict
    machine: MachineState
    vm: VmState
    vcpus: tuple[VcpuState, ...]
    devices: dict[str, dict]
    pci: dict | None
    quirks: QuirksState


def canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode()


def checksum(document: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in document.items()
                                     if k != "checksum"})).hexdigest()


def read_document(directory: Path) -> SnapshotDocument:
    """state.json of ``directory``, read and checked (see the module's docstring)."""
    path = directory / STATE_FILE
    data = read_state_file(directory, path)
    try:
        document = json.loads(data, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = f" ({error.msg} at line {error.lineno})" if isinstance(
            error, json.JSONDecodeError) else ""
        raise SnapshotError(f"{path}: not valid JSON{where}: truncated or damaged") from None
    except (ValueError, RecursionError) as error:   # >4300 digits, NaN, nesting
        raise SnapshotError(f"{path}: not a JSON snapshot pykvm reads "
                            f"({str(error).splitlines()[0][:80]})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a pykvm snapshot (format is not {FORMAT!r})")
    version = document.get("version")
    if type(version) is not int or (version != VERSION and version not in MIGRATED):
        from .. import __version__   # importlib.metadata: only for this message (start-up)
        raise SnapshotError(f"{path}: snapshot format version {str(version)[:20]}; this pykvm "
                            f"({__version__}) reads versions {', '.join(map(str, MIGRATED))} "
                            f"(converted) and {VERSION}")
    if document.get("checksum") != checksum(document):
        raise SnapshotError(f"{path}: checksum mismatch: the file was changed or damaged "
                            f"after the snapshot was taken")
    if version != VERSION:
        document = migrate(document, version)
    return decode(SnapshotDocument, document, "")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_state_file(directory: Path, path: Path) -> bytes:
    """The bytes of state.json: a regular file (O_NOFOLLOW, O_NONBLOCK for a FIFO), of at
    most MAX_STATE_BYTES."""
    if not directory.is_dir():
        raise SnapshotError(f"{directory}: no such snapshot directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{directory}: not a pykvm snapshot (no {STATE_FILE})") from None
    except OSError as error:
        why = "a symbolic link" if error.errno == errno.ELOOP else error.strerror
        raise SnapshotError(f"{path}: cannot read: {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotError(f"{path}: not a regular file")
        if info.st_size > MAX_STATE_BYTES:
            raise SnapshotError(f"{path}: {info.st_size} bytes, more than a snapshot's state "
                                f"({MAX_STATE_BYTES >> 20} MiB at most)")
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(MAX_STATE_BYTES + 1)
        if len(data) > MAX_STATE_BYTES:
            raise SnapshotError(f"{path}: grew past {MAX_STATE_BYTES >> 20} MiB while read")
        return data
    except OSError as error:
        raise SnapshotError(f"{path}: cannot read: {error.strerror}") from None
    finally:
        os.close(fd)


def check_memory_file(directory: Path, memory: MemoryState) -> Path:
    """memory.bin: a regular file of the size the document says."""
    path = directory / MEMORY_FILE
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: missing (the snapshot's guest memory)") from None
    except OSError as error:
        raise SnapshotError(f"{path}: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"{path}: not a regular file")
    if info.st_size != memory.size:
        raise SnapshotError(f"{path}: {info.st_size} bytes, the snapshot says {memory.size}: "
                            f"truncated or not this snapshot's memory")
    return path


def check_layout(memory: MemoryState, expected: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The regions as (guest_addr, size, file_offset), if they are exactly the RAM layout
    ``expected`` (pykvm.layout.ram_ranges of the configured size), one after another in
    the file: anything else is not a snapshot pykvm wrote."""
    layout, offset = [], 0
    for start, size in expected:
        layout.append((start, size, offset))
        offset += size
    found = [(r.guest_addr, r.size, r.file_offset) for r in memory.regions]
    if found != layout or memory.size != offset:
        raise SnapshotError(f"state.json: memory: regions {_ranges(found)} of {memory.size} "
                            f"bytes are not the RAM layout of the configuration "
                            f"({_ranges(layout)})")
    return layout


def _ranges(layout) -> str:
    shown = ", ".join(f"{start:#x}+{size:#x}@{offset:#x}" for start, size, offset in layout[:4])
    return f"[{shown}{', ...' if len(layout) > 4 else ''}]"
