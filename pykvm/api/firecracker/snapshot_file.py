"""Firecracker's snapshot files over pykvm's snapshot directory (Firecracker's
``docs/snapshotting/snapshot-support.md``: ``PUT /snapshot/create`` writes two files the
caller names, ``snapshot_path`` and ``mem_file_path``; ``PUT /snapshot/load`` reads
them back, with ``network_overrides`` since Firecracker 1.12).

pykvm's snapshot is a directory (state.json, memory.bin: pykvm/snapshot/). The two
files are made in a private directory beside ``mem_file_path`` and renamed onto the
caller's paths (:func:`workdir_beside`, :func:`move_file`). pykvm's machine
configuration knows its NICs by position only; Firecracker's load re-points them by
iface_id, so the file at ``snapshot_path`` carries the NICs' ids beside pykvm's
state.json, whose text is kept byte for byte (:func:`wrap_state`,
:func:`unwrap_state`, :func:`network_overrides`). The file is the caller's, but a
damaged one is a 400, never a traceback: reads are bounded, every field checked.

Why a module of its own: this is a file format and its checks, apart from the
microVM's life in pykvm/api/firecracker/vmm.py, which calls it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .machine_resources import MAX_NICS
from .resources import ApiFault, NetworkInterface

MAX_STATE_FILE = 64 << 20     # a pykvm state.json (pykvm/snapshot/document.py bounds it too)
SNAPSHOT_WRAPPER = "pykvm_firecracker_snapshot"


def workdir_beside(beside: str, what: str) -> Path:
    """A private (0700, new) directory in ``beside``'s directory."""
    try:
        return Path(tempfile.mkdtemp(prefix=".pykvm-snapshot-",
                                     dir=os.path.dirname(os.path.abspath(beside))))
    except OSError as error:
        raise ApiFault(f"{what}: {beside}: {error.strerror}") from None


def move_file(source: Path, target: str) -> None:
    try:
        os.replace(source, target)
    except OSError as error:
        if error.errno != 18:       # EXDEV: another file system
            raise
        shutil.copyfile(source, target)


SNAPSHOT_WRAPPER = "pykvm_firecracker_snapshot"


def wrap_state(state: Path, interfaces: list[tuple[str, str]]) -> None:
    """Rewrite pykvm's ``state`` file as the snapshot file: a JSON object holding its
    text and each NIC's (iface_id, host_dev_name), in the machine's NIC order."""
    text = state.read_text()
    wrapped = {SNAPSHOT_WRAPPER: 1, "state_json": text,
               "network_interfaces": [{"iface_id": i, "host_dev_name": h}
                                      for i, h in interfaces]}
    state.write_text(json.dumps(wrapped))


def unwrap_state(source: str, target: Path) -> list[tuple[str, str]]:
    """pykvm's state.json out of the snapshot file ``source`` into ``target`` (new, not
    following a symlink); returns the NICs' (iface_id, host_dev_name). A plain state.json
    (pykvm's own snapshot) is taken as it is, with no NIC ids. Bounded, and every field
    checked: the file is the caller's, but a damaged one gets a 400, not a traceback."""
    what = f"Load snapshot error: {source}"
    with open(source, "rb") as stream:
        data = stream.read(2 * MAX_STATE_FILE + 1)
    if len(data) > 2 * MAX_STATE_FILE:
        raise ApiFault(f"{what}: larger than a pykvm snapshot's state")
    interfaces: list[tuple[str, str]] = []
    try:
        document = json.loads(data)
    except ValueError:
        document = None                 # pykvm's reader says what is wrong with it
    if isinstance(document, dict) and SNAPSHOT_WRAPPER in document:
        text, nics = document.get("state_json"), document.get("network_interfaces")
        if not isinstance(text, str) or not isinstance(nics, list) or len(nics) > MAX_NICS:
            raise ApiFault(f"{what}: not a pykvm-firecracker snapshot file")
        for nic in nics:
            if not (isinstance(nic, dict) and isinstance(nic.get("iface_id"), str) and
                    isinstance(nic.get("host_dev_name"), str)):
                raise ApiFault(f"{what}: not a pykvm-firecracker snapshot file")
            interfaces.append((nic["iface_id"], nic["host_dev_name"]))
        data = text.encode()
        if len(data) > MAX_STATE_FILE:
            raise ApiFault(f"{what}: larger than a pykvm snapshot's state")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    return interfaces


def network_overrides(interfaces: list[tuple[str, str]], overrides) -> list | None:
    """PUT /snapshot/load's ``network_overrides`` (Firecracker >= 1.12) as pykvm's restore
    takes them: a NetSpec per snapshot NIC, in order, the named ones on their new TAP
    (pykvm/snapshot/resources.py keeps each NIC's MAC: the guest has it); None when there
    are none (the snapshot's own TAPs). An iface_id the snapshot has no NIC of is a 400,
    as in Firecracker."""
    if not overrides:
        return None
    known = dict(interfaces)
    for override in overrides:
        if override.iface_id not in known:
            raise ApiFault(f"Load snapshot error: network_overrides: the snapshot has no "
                           f"network interface {override.iface_id[:64]!r}")
        known[override.iface_id] = override.host_dev_name
    return [NetworkInterface(iface_id=i, host_dev_name=h).net_spec() for i, h in known.items()]
