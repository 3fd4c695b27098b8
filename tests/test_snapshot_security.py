"""Snapshots as an attack surface (issue #12, items 7, 9 and 11).

* Other local users: a symlink planted where a snapshot is written (memory.bin,
  state.json, the directory itself) or a directory they can write to never makes
  pykvm write through it; the snapshot is refused with one line and the victim file
  is unchanged.
* Crafted state.json: wrong types, sizes, offsets, missing keys, huge numbers: a
  one-line SnapshotError from restore_machine() and one line from
  `pykvm run --restore`, never an internal error or a traceback.
* Host resources: a snapshot's disks, shares and NICs are used only when the command
  line (or the library caller) confirms them; read-only never becomes read-write.
"""

import io
import os
import stat
import time
from pathlib import Path

import pytest

from pykvm.machine import Machine
from pykvm.snapshot import SnapshotError, restore_machine, save_snapshot

from .conftest import needs_kvm
from .test_snapshot import counting_guest, flat_config  # noqa: F401  (a fixture)

VICTIM_TEXT = b"the victim's own content\n"


@pytest.fixture
def machine(counting_guest):  # noqa: F811
    with Machine(flat_config(counting_guest), stdout=io.BytesIO()) as machine:
        machine.vm.start()
        time.sleep(0.1)
        yield machine
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim" / "precious"
    path.parent.mkdir()
    path.write_bytes(VICTIM_TEXT)
    return path


def refused_save(machine, directory, match: str) -> str:
    with pytest.raises(SnapshotError) as caught:
        save_snapshot(machine, directory)
    message = str(caught.value)
    assert "\n" not in message and match in message, message
    return message


# --- item 9: writing a snapshot where others can plant files -----------------------------------------
@needs_kvm
@pytest.mark.parametrize("name", ["memory.bin", "state.json", ".memory.bin.tmp.x"])
def test_a_symlink_planted_in_the_directory_is_never_followed(machine, victim, tmp_path, name):
    directory = tmp_path / "snap"
    directory.mkdir(mode=0o700)
    (directory / name).symlink_to(victim)
    refused_save(machine, directory, "" if name.startswith(".") else "not a regular file")
    assert victim.read_bytes() == VICTIM_TEXT
    assert (directory / name).is_symlink()


@needs_kvm
def test_the_directory_itself_a_symlink_is_refused(machine, victim, tmp_path):
    directory = tmp_path / "snap"
    directory.symlink_to(victim.parent)
    refused_save(machine, directory, "symbolic link")
    assert sorted(os.listdir(victim.parent)) == ["precious"]
    assert victim.read_bytes() == VICTIM_TEXT
    (tmp_path / "file").write_bytes(b"")
    refused_save(machine, tmp_path / "file", "not a directory")


@needs_kvm
def test_a_directory_others_can_write_is_refused(machine, victim, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                 # no sticky bit: anyone may swap what is in it
    refused_save(machine, shared / "snap", "writable by other users and not sticky")
    assert not (shared / "snap").exists()
    shared.chmod(0o1777)                # like /tmp: others cannot touch what we create
    save_snapshot(machine, shared / "snap")
    assert stat.S_IMODE((shared / "snap").stat().st_mode) == 0o700
    assert {p.name for p in (shared / "snap").iterdir()} == {"state.json", "memory.bin"}
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    refused_save(machine, open_dir, "writable by other users")


@needs_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's directory")
def test_another_users_directory_is_refused(machine, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    refused_save(machine, theirs / "snap", "belongs to another user")
    (theirs / "snap").mkdir(mode=0o700)
    os.chown(theirs / "snap", 65534, 65534)
    theirs.chmod(0o755)
    os.chown(theirs, 0, 0)
    refused_save(machine, theirs / "snap", "belongs to another user")


@needs_kvm
def test_a_non_empty_directory_is_refused_and_a_previous_snapshot_replaced(machine, tmp_path):
    directory = tmp_path / "snap"
    directory.mkdir(mode=0o700)
    (directory / "notes.txt").write_text("mine")
    refused_save(machine, directory, "not empty")
    (directory / "notes.txt").unlink()
    save_snapshot(machine, directory)
    inode = (directory / "memory.bin").stat().st_ino
    (directory / ".memory.bin.tmp").write_bytes(b"left by a crash")
    save_snapshot(machine, directory)          # replaced: a new inode, the leftover gone
    assert (directory / "memory.bin").stat().st_ino != inode
    assert {p.name for p in directory.iterdir()} == {"state.json", "memory.bin"}
    with restore_machine(directory, stdout=io.BytesIO()):
        pass


@needs_kvm
def test_the_parent_must_exist(machine, tmp_path):
    refused_save(machine, tmp_path / "no" / "snap", "cannot open the directory")
