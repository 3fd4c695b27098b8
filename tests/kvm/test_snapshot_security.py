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

import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.devices.virtio import DiskSpec
from pykvm.machine import MachineConfig, build_for_boot
from pykvm.snapshot import SnapshotError, restore_machine, save_snapshot

from ..conftest import needs_kvm
from .test_snapshot import REPO, flat_config
from .test_snapshot import counting_guest, good_snapshot, snapshot_copy  # noqa: F401 (fixtures)

VICTIM_TEXT = b"the victim's own content\n"


@pytest.fixture
def machine(counting_guest):  # noqa: F811
    with build_for_boot(flat_config(counting_guest), stdout=io.BytesIO()) as machine:
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
def test_ctl_snapshot_into_a_planted_symlink_is_one_error_line(machine, victim, tmp_path):
    """The control socket's `snapshot` (what `pykvm ctl SOCK snapshot DIR` sends)."""
    from pykvm.control import ControlServer, request
    directory = tmp_path / "snap"
    directory.mkdir(mode=0o700)
    (directory / "memory.bin").symlink_to(victim)
    with ControlServer(tmp_path / "sock", machine):
        response = request(tmp_path / "sock", {"action": "snapshot", "path": str(directory)})
    assert response["ok"] is False and "not a regular file" in response["error"]
    assert "\n" not in response["error"]
    assert victim.read_bytes() == VICTIM_TEXT


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


# --- item 7: a crafted state.json is one line, never an internal error --------------------------------
def set_at(document, path, value):
    """``document`` with the value at ``path`` (keys and indices) replaced, or deleted
    when ``value`` is DELETE."""
    target = document
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


DELETE = object()
HUGE = 10 ** 30
CRAFTED = [
    (("memory",), "x"), (("memory", "size"), HUGE), (("memory", "size"), -1),
    (("memory", "size"), "12"), (("memory", "size"), True),
    (("memory", "regions", 0, "file_offset"), 4096), (("memory", "regions", 0, "file_offset"), -4096),
    (("memory", "regions", 0, "file_offset"), (1 << 64) - 4096),
    (("memory", "regions", 0, "size"), 0), (("memory", "regions", 0, "size"), 1),
    (("memory", "regions", 0, "size"), HUGE), (("memory", "regions"), []),
    (("memory", "regions"), [{}]), (("memory", "regions"), [{"guest_addr": 0}] * 1000),
    (("memory", "regions", 0, "guest_addr"), 0x1000), (("memory", "sha256"), "zz"),
    (("memory", "file"), "../../etc/passwd"), (("memory", "regions", 0), DELETE),
    (("config", "disks", 0, "serial"), "\x80"), (("config", "disks", 0, "path"), "a,b"),
    (("config",), []), (("config", "mem_size"), 1 << 62), (("config", "mem_size"), "1G"),
    (("config", "mem_size"), 0), (("config", "mem_size"), 4097), (("config", "cpus"), 0),
    (("config", "cpus"), 1000), (("config", "cpus"), True), (("config", "cpus"), 2),
    (("config", "disks"), "x"), (("config", "disks"), [{"tag": "os:system"}]),
    (("config", "disks"), [{"tag": "pykvm.machine:MachineConfig"}]),
    (("config", "disks"), [{"tag": "disk", "path": 1}]),
    (("config", "disks"), [{"tag": "disk"}]),
    (("config", "disks"), [7] * 100), (("config", "flat"), 5), (("config", "flat"), None),
    (("config", "console"), "nope"), (("config", "kvm_device"), 3), (("config", "extra"), 3),
    (("config", "shares"), [1]), (("config", "nets"), [{"tag": "net",
                                                       "mac": "zz"}]),
    (("config", "surprise"), 1), (("config", "extra"), {"x": []}), (("vcpus",), []), (("vcpus",), {}), (("vcpus",), [1]),
    (("vcpus", 0, "regs", "rip"), 1 << 64), (("vcpus", 0, "regs", "rip"), -1),
    (("vcpus", 0, "regs", "rip"), "0"), (("vcpus", 0, "regs", "rip"), 1.5),
    (("vcpus", 0, "regs", "rip"), None), (("vcpus", 0, "regs", "rip"), DELETE),
    (("vcpus", 0, "sregs", "cs", "selector"), 1 << 16), (("vcpus", 0, "sregs"), []),
    (("vcpus", 0, "id"), 9), (("vcpus", 0, "id"), -1), (("vcpus", 0, "msrs"), {"zz": 1}),
    (("vcpus", 0, "msrs"), {"0x10": 1 << 64}), (("vcpus", 0, "msrs"), {"0x10": -1}),
    (("vcpus", 0, "msrs"), {"0x" + "f" * 30: 1}), (("vcpus", 0, "lapic"), "!!!!"),
    (("vcpus", 0, "lapic"), "AAAA"), (("vcpus", 0, "lapic"), 5), (("vcpus", 0, "xsave"), "AAAA"),
    (("vcpus", 0, "xsave"), "A" * 100000), (("vcpus", 0, "cpuid"), [{}] * 300),
    (("vcpus", 0, "cpuid"), [5]), (("vcpus", 0, "mp_state"), 1 << 40),
    (("vcpus", 0, "fpu", "fpr"), [[0] * 16] * 7), (("vcpus", 0, "events", "exception"), 3),
    (("vm", "irqchip", "ioapic"), []), (("vm", "clock", "clock"), -1), (("vm", "pit"), 0),
    (("vm", "pit", "channels"), []), (("vm", "irqchip", "pic_master", "irr"), 256),
    (("devices", "serial@0x3f8"), 5), (("devices", "serial@0x3f8"), {}),
    (("devices",), {"x@0": {}}), (("pci",), None), (("pci",), 7), (("pci",), {}),
    (("pci", "slots"), {"999": {}}), (("pci", "slots"), []), (("quirks",), []),
    (("quirks", "name"), 5), (("machine", "command_started"), "yes"), (("machine",), DELETE),
    (("version",), True), (("version",), "1"), (("version",), 1.0), (("host_kind",), 5),
    (("created",), "x" * 100000), (("format",), None), (("surprise",), 1),
]


def write_crafted(directory: Path, change) -> None:
    from pykvm.snapshot.snapshot import checksum
    state = directory / "state.json"
    document = json.loads(state.read_text())
    change(document)
    document["checksum"] = checksum(document)
    state.write_text(json.dumps(document))


def restore_refuses_or_works(directory: Path) -> str | None:
    """None if the restore worked, else the refusal's one line; anything but a
    SnapshotError fails the test."""
    try:
        with restore_machine(directory, stdout=io.BytesIO(), trust=True):
            return None
    except SnapshotError as error:
        message = str(error)
        assert message and "\n" not in message, message
        return message


@needs_kvm
@pytest.mark.parametrize("path, value", CRAFTED,
                         ids=[f"{'.'.join(map(str, p))}={str(v)[:12]}" for p, v in CRAFTED])
def test_a_crafted_field_is_refused_with_one_line(snapshot_copy, path, value):
    directory, _ = snapshot_copy
    write_crafted(directory, lambda document: set_at(document, path, value))
    assert restore_refuses_or_works(directory) is not None


@needs_kvm
@pytest.mark.parametrize("text", [
    '{"format": "pykvm-snapshot", "version": 1, "x": ' + "9" * 5000 + "}",
    "[" * 100000 + "]" * 100000,
    '{"format": "pykvm-snapshot", "version": 1, "x": NaN}',
    '{"format": "pykvm-snapshot", "version": 1, "x": Infinity}',
    "\udcff\udcfe", "", "null", "[]",
])
def test_state_json_python_cannot_parse_is_one_line(snapshot_copy, text):
    directory, _ = snapshot_copy
    (directory / "state.json").write_bytes(text.encode(errors="surrogateescape"))
    assert restore_refuses_or_works(directory) is not None


@needs_kvm
def test_state_and_memory_files_that_are_not_regular_files(snapshot_copy, tmp_path):
    directory, _ = snapshot_copy
    state, memory = directory / "state.json", directory / "memory.bin"
    state.rename(tmp_path / "state.json")
    os.mkfifo(state)                       # a FIFO would block the restore forever
    assert "not a regular file" in restore_refuses_or_works(directory)
    state.unlink()
    state.symlink_to(tmp_path / "state.json")
    assert "symbolic link" in restore_refuses_or_works(directory)
    state.unlink()
    with open(state, "wb") as big:           # sparse: costs no disk
        big.truncate(65 << 20)
    assert "more than a snapshot's state" in restore_refuses_or_works(directory)
    (tmp_path / "state.json").replace(state)
    memory.unlink()
    os.mkfifo(memory)
    assert "memory.bin: not a regular file" in restore_refuses_or_works(directory)
    memory.unlink()
    memory.symlink_to("/dev/zero")
    assert "memory.bin: not a regular file" in restore_refuses_or_works(directory)


LEAVES = st.one_of(
    st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70), st.booleans(),
    st.none(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.just(DELETE), st.lists(st.integers(), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


def paths(value, prefix=()):
    """Every path to a value inside the document."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:4]):
            yield from paths(item, prefix + (index,))


@needs_kvm
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_changes_to_state_json_are_refused_or_restored(good_snapshot, tmp_path_factory,
                                                              data):
    """Hypothesis picks any value in the document (the envelope, the config, a register,
    a device's FIFO, a virtqueue's address...) and puts another kind of value there
    (or deletes it): the restore works or is one SnapshotError line."""
    source, _ = good_snapshot
    directory = tmp_path_factory.mktemp("fuzz") / "snap"
    shutil.copytree(source, directory)
    document = json.loads((directory / "state.json").read_text())
    every = [p for p in paths(document) if p and p[0] != "checksum"]
    changes = data.draw(st.lists(st.tuples(st.sampled_from(every), LEAVES), min_size=1,
                                 max_size=3))

    def change(document):
        for path, value in changes:
            try:
                set_at(document, path, value)
            except (KeyError, IndexError, TypeError):
                pass                       # an earlier change removed or replaced its parent
    write_crafted(directory, change)
    restore_refuses_or_works(directory)
    shutil.rmtree(directory.parent)


@pytest.mark.parametrize("path, value", [(("vcpus", 0, "regs", "rip"), 1 << 64),
                                         (("config", "mem_size"), "1G"),
                                         (("memory", "regions", 0, "file_offset"), -4096),
                                         (("pci", "slots"), [])])
def test_cli_restore_of_a_crafted_snapshot_is_one_line_exit_2(snapshot_copy, path, value):
    directory, _ = snapshot_copy
    write_crafted(directory, lambda document: set_at(document, path, value))
    result = subprocess.run([sys.executable, "-m", "pykvm", "run", "--restore", str(directory),
                             "--trust-snapshot"], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("pykvm: error: ") and result.stderr.count("\n") == 1
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr


# --- item 11: host resources come from the caller -----------------------------------------------------
def disk_record(path, read_only=False, serial=""):
    return {"tag": "disk", "path": str(path),
            "read_only": read_only, "serial": serial}


def refused_restore(directory, match: str, **kwargs) -> str:
    with pytest.raises(SnapshotError) as caught:
        with restore_machine(directory, stdout=io.BytesIO(), **kwargs):
            pass
    message = str(caught.value)
    assert "\n" not in message and match in message, message
    return message


@needs_kvm
def test_a_snapshot_naming_a_disk_needs_it_confirmed(snapshot_copy):
    directory, image = snapshot_copy
    message = refused_restore(directory, "names host resources")
    assert f"disk {image} (read-write)" in message
    assert "--disk" in message and "--trust-snapshot" in message
    with restore_machine(directory, stdout=io.BytesIO(), disks=[DiskSpec(str(image))]) as machine:
        assert machine.virtio.disks[0].path == str(image)
    with restore_machine(directory, stdout=io.BytesIO(), trust=True) as machine:
        assert machine.virtio.disks[0].path == str(image)


@needs_kvm
def test_a_crafted_snapshot_cannot_re_point_a_disk(snapshot_copy, victim, tmp_path):
    """The snapshot's disk re-pointed at a victim file of the same size and made
    writable (checksum fixed): refused, naming the victim; with the user's --disk the
    user's image is used; the victim never changes."""
    directory, image = snapshot_copy
    victim.write_bytes(VICTIM_TEXT.ljust(1 << 20, b"\0"))
    write_crafted(directory, lambda d: d["config"].update(disks=[disk_record(victim)]))
    refused_restore(directory, f"disk {victim} (read-write)")
    with restore_machine(directory, stdout=io.BytesIO(), disks=[DiskSpec(str(image))]) as machine:
        assert machine.virtio.disks[0].path == str(image)
    assert victim.read_bytes().startswith(VICTIM_TEXT)


@needs_kvm
def test_overrides_match_the_snapshots_disks(snapshot_copy):
    directory, image = snapshot_copy
    refused_restore(directory, "the snapshot has 1 disk(s), 0 --disk given", disks=[])
    refused_restore(directory, "the snapshot has 1 disk(s), 2 --disk given",
                    disks=[DiskSpec(str(image))] * 2)
    refused_restore(directory, "the serial is the snapshot's",
                    disks=[DiskSpec(str(image), serial="other")])
    other = image.with_name("bigger.img")
    other.write_bytes(bytes(2 << 20))
    refused_restore(directory, "it was changed", disks=[DiskSpec(str(other))])


@needs_kvm
def test_read_only_is_never_widened(counting_guest, tmp_path):  # noqa: F811
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = flat_config(counting_guest)
    config.disks = [DiskSpec(str(image), read_only=True)]
    with build_for_boot(config, stdout=io.BytesIO()) as machine:
        save_snapshot(machine, tmp_path / "snap")
    for kwargs in ({"disks": [DiskSpec(str(image))]}, {"trust": True}):
        with restore_machine(tmp_path / "snap", stdout=io.BytesIO(), **kwargs) as machine:
            assert machine.virtio.disks[0].read_only and machine.config.disks[0].read_only
    with build_for_boot(flat_config(counting_guest, disks=[DiskSpec(str(image))]),
                        stdout=io.BytesIO()) as machine:
        save_snapshot(machine, tmp_path / "rw")
    with restore_machine(tmp_path / "rw", stdout=io.BytesIO(),
                         disks=[DiskSpec(str(image), read_only=True)]) as machine:
        assert machine.virtio.disks[0].read_only        # an override may narrow


@dataclasses.dataclass
class GadgetConfig(MachineConfig):
    gadgets: list = dataclasses.field(default_factory=list)


@needs_kvm
def test_a_config_list_the_snapshot_code_does_not_know_is_refused_unless_empty(snapshot_copy,
                                                                              monkeypatch):
    """A device kind added to MachineConfig that the snapshot code does not check (nor
    confirm as a host resource) is restored only when the snapshot has none."""
    from pykvm import machine as machine_module
    directory, image = snapshot_copy
    monkeypatch.setattr(machine_module, "MachineConfig", GadgetConfig)
    write_crafted(directory, lambda d: d["config"].update(gadgets=[]))
    with restore_machine(directory, stdout=io.BytesIO(), trust=True) as machine:
        assert machine.config.gadgets == []
    write_crafted(directory, lambda d: d["config"].update(gadgets=["/dev/sda"]))
    refused_restore(directory, "config.gadgets: a snapshot with gadgets is not restored",
                    trust=True)


@needs_kvm
def test_shares_nets_and_the_kvm_device_are_not_the_snapshots(snapshot_copy, tmp_path):
    directory, image = snapshot_copy
    net = {"tag": "net", "tap": "evil0", "mac": None,
           "bridge": "br-evil", "host_ip": None, "netns": None}
    write_crafted(directory, lambda d: d["config"].update(shares=["/etc"], nets=[net],
                                                          agent=True, flat=None,
                                                          kernel="/boot/vmlinuz",
                                                          mem_size=64 << 20))
    message = refused_restore(directory, "names host resources", disks=[DiskSpec(str(image))])
    assert "share /etc" in message and "net tap=evil0,bridge=br-evil" in message
    assert "disk" not in message.split("(")[1]          # the disk was confirmed
    write_crafted(directory, lambda d: d["config"].update(
        kvm_device="/nonexistent", shares=[], nets=[], agent=False, flat=str(image),
        kernel=None, mem_size=d["memory"]["size"]))
    with restore_machine(directory, stdout=io.BytesIO(), trust=True) as machine:
        assert machine.config.kvm_device == "/dev/kvm"


def run_pykvm(*args):
    return subprocess.run([sys.executable, "-m", "pykvm", "run", *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          cwd=str(REPO), stdin=subprocess.DEVNULL)


@needs_kvm
def test_cli_restore_lists_the_host_resources_and_exits_2(snapshot_copy):
    directory, image = snapshot_copy
    result = run_pykvm("--restore", str(directory))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"disk {image} (read-write)" in result.stderr and "--trust-snapshot" in result.stderr
    result = run_pykvm("--restore", str(directory), "--disk", str(image), "--disk", str(image))
    assert result.returncode == 2 and "2 --disk given" in result.stderr, result.stderr
    result = run_pykvm("--trust-snapshot", "--flat", str(image))
    assert result.returncode == 2 and "goes with --restore" in result.stderr, result.stderr
