"""Typed per-component state (pykvm/snapshot/state.py), older snapshot formats
(pykvm/snapshot/migrate.py) and the machine builder (pykvm/machine/builder.py).

tests/data/snapshot-v1/ is a snapshot pykvm wrote in format version 1 (before typed
state: ``"__type__": "module:Class"`` records, untagged parts): a real-mode flat guest
counting in EBX and at 0x18000, with virtio-rng and a 1 MiB disk on PCI, taken on a
kvm_pvm host (its paths rewritten to /fixture/...). Its memory.bin is kept gzipped.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from pykvm import layout
from pykvm.devices.acpi_pm import AcpiPm, AcpiPmState
from pykvm.devices.i8042 import I8042State
from pykvm.devices.serial import Serial, SerialState
from pykvm.devices.virtio.pci import VirtioPciState
from pykvm.errors import ConfigError
from pykvm.kvm import detect_host_kind
from pykvm.machine import DiskSpec, MachineConfig, build_for_boot, build_from_snapshot
from pykvm.snapshot import SnapshotError, save_snapshot
from pykvm.snapshot.document import VERSION, checksum, read_document
from pykvm.snapshot.schema import STATE_TAGS
from pykvm.snapshot.snapshot import _part
from pykvm.snapshot.state import ComponentState, decode_for, restore_part

from ..conftest import needs_kvm
from ..fakes import FakeIrqLine
from .test_snapshot import counting_guest  # noqa: F401 - the flat guest that counts (a fixture)
from .test_snapshot import snapshot_of_running

FIXTURE = Path(__file__).parents[1] / "data" / "snapshot-v1"
COUNTER_ADDR = layout.FLAT_LOAD_ADDR + 0x8000


def one_line(error: BaseException, pattern: str) -> str:
    message = str(error)
    assert "\n" not in message and re.search(pattern, message), message
    return message


# --- the protocol -------------------------------------------------------------------------------
def test_every_state_is_a_frozen_tagged_dataclass():
    import pykvm.devices.rtc  # noqa: F401 - a state is registered when its module is imported
    import pykvm.devices.virtio.attach  # noqa: F401
    import pykvm.devices.virtio.balloon  # noqa: F401
    import pykvm.devices.virtio.ports  # noqa: F401
    import pykvm.vstate.kvmstate  # noqa: F401
    expected = {"serial", "rtc", "i8042", "ps2-keyboard", "acpi-pm", "pci-bus", "pci-config",
                "msix", "virtio-pci", "virtio-mmio", "virtqueue", "virtio-blk", "virtio-serial",
                "virtio-balloon", "quirks", "pf-hook-plant", "vcpu", "vm"}
    assert expected <= set(STATE_TAGS)
    for tag, kind in STATE_TAGS.items():
        assert dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen, tag
        assert issubclass(kind, ComponentState) and kind.tag == tag
    with pytest.raises(TypeError, match="state tag 'serial' is taken by SerialState"):
        @dataclasses.dataclass(frozen=True)
        class Impostor(ComponentState, tag="serial"):
            x: int


def test_a_state_goes_through_json_and_back_unchanged():
    serial = Serial(FakeIrqLine(), io.BytesIO(), flush_delay=None)
    serial.write(7, 1, 0x5A)
    serial.receive(b"\x00\xffbinary")
    state = serial.save_state()
    text = json.dumps(state.to_json())
    assert json.loads(text)["tag"] == "serial"
    again = decode_for(serial, json.loads(text), "devices.serial@0x3f8")
    assert again == state and isinstance(again, SerialState)


def test_a_state_of_another_kind_or_tag_is_refused_in_one_line():
    pm = AcpiPm(lambda: None)
    serial_state = Serial(FakeIrqLine(), io.BytesIO(), flush_delay=None).save_state()
    with pytest.raises(SnapshotError) as caught:
        restore_part(pm, serial_state, "devices.acpi-pm@0x600")
    one_line(caught.value, r"devices.acpi-pm@0x600: serial state given to a acpi-pm")
    with pytest.raises(SnapshotError) as caught:
        decode_for(pm, {**serial_state.to_json()}, "devices.acpi-pm@0x600")
    one_line(caught.value, r"tag 'serial' is not 'acpi-pm'")
    with pytest.raises(SnapshotError) as caught:
        AcpiPmState.from_json({"tag": "acpi-pm", "status": 1, "enable": 1 << 16, "control": 0},
                              "devices.acpi-pm@0x600")
    one_line(caught.value, r"devices.acpi-pm@0x600.enable: 65536 is out of range")


def test_a_bug_in_a_part_is_not_reported_as_a_bad_snapshot():
    """Before typed state, the orchestration turned AttributeError and TypeError from a
    part's restore into 'bad or missing value in state.json', hiding pykvm's own bugs."""
    for bug in (AttributeError("'NoneType' object has no attribute 'x'"), TypeError("bug")):
        with pytest.raises(type(bug)):
            with _part("serial@0x3f8"):
                raise bug
    with pytest.raises(SnapshotError) as caught:
        with _part("serial@0x3f8"):
            raise SnapshotError("rx trigger 3")
    assert str(caught.value) == "state.json: serial@0x3f8: rx trigger 3"


# --- format version 1 ---------------------------------------------------------------------------
@pytest.fixture
def v1_snapshot(tmp_path):
    directory = tmp_path / "v1"
    directory.mkdir(mode=0o700)
    shutil.copy(FIXTURE / "state.json", directory / "state.json")
    with gzip.open(FIXTURE / "memory.bin.gz") as packed:
        (directory / "memory.bin").write_bytes(packed.read())
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    return directory, disk


def rewrite(directory: Path, change) -> None:
    document = json.loads((directory / "state.json").read_text())
    change(document)
    document["checksum"] = checksum(document)
    (directory / "state.json").write_text(json.dumps(document))


def test_a_version_1_snapshot_is_read_through_its_migration(v1_snapshot):
    directory, _ = v1_snapshot
    assert json.loads((directory / "state.json").read_text())["version"] == 1
    document = read_document(directory)
    assert document.version == VERSION == 2
    assert document.vcpus[0].id == 0 and document.vcpus[0].regs.rbx > 0
    assert document.quirks.name == "kvm_pvm" and document.quirks.plants == ()
    from pykvm.devices.pci.bus import PciBusState, PciSlotState
    from pykvm.devices.ps2_keyboard import Ps2Keyboard
    from pykvm.snapshot.schema import decode
    i8042 = decode(I8042State, document.devices["i8042@0x60"], "devices.i8042@0x60")
    assert i8042.keyboard == Ps2Keyboard().save_state() and not i8042.xlate_break
    pci = decode(PciBusState, document.pci, "pci")
    assert isinstance(pci.slots["1"], PciSlotState)
    function = pci.slots["1"].device
    assert isinstance(function, VirtioPciState) and function.device.tag == "virtio-blk"
    assert function.device.path == "/fixture/disk.img" and function.device.size == 1 << 20
    from pykvm.snapshot.config import decode_config
    config = decode_config(document.config)
    assert config.disks == [DiskSpec("/fixture/disk.img")] and config.rng
    assert config.flat == Path("/fixture/count.bin") and config.mem_size == 0x120000


@pytest.mark.parametrize("change, message", [
    (lambda d: d["config"]["disks"][0].update(__type__="os:system"),
     r"config.disks\[0\]: a record of type 'os:system', not one version 1 wrote"),
    (lambda d: d["config"]["disks"][0].update(__type__="pykvm.machine.config:DiskSpec"),
     r"config.disks\[0\]: a record of type 'pykvm.machine.config:DiskSpec'"),
    (lambda d: d["config"].update(extra={"x": 1}),
     r"config.extra: a snapshot with extra settings is not restored by this pykvm"),
    (lambda d: d["devices"].update({"gadget@0x99": {}}),
     r"devices.gadget@0x99: not a device version 1 saved"),
    (lambda d: d["quirks"]["syscalls"]["plants"].append({"displaced": "zz"}),
     r"quirks.syscalls.plants\[0\].displaced: not hex bytes"),
    (lambda d: d["pci"]["slots"]["1"]["device"].update(device_id=99),
     r"state of virtio device 99, which version 1 did not save"),
    (lambda d: d["vcpus"][0]["regs"].update(rip=1 << 64),
     r"state.json: vcpus\[0\].regs: kvm_regs.rip: .* does not fit in 64 bits"),
    (lambda d: d.update(version=0),
     r"snapshot format version 0; this pykvm .* reads versions 1 \(converted\) and 2$"),
])
def test_a_version_1_snapshot_it_cannot_convert_is_refused_in_one_line(v1_snapshot, change,
                                                                       message):
    directory, _ = v1_snapshot
    rewrite(directory, change)
    with pytest.raises(SnapshotError) as caught:
        read_document(directory)
    one_line(caught.value, message)


def test_a_version_1_snapshot_keeps_its_checksum_check(v1_snapshot):
    directory, _ = v1_snapshot
    text = (directory / "state.json").read_text().replace('"cpus": 1', '"cpus": 2')
    (directory / "state.json").write_text(text)
    with pytest.raises(SnapshotError) as caught:
        read_document(directory)
    one_line(caught.value, "checksum mismatch")


@needs_kvm
def test_a_version_1_snapshot_restores_and_the_guest_counts_on(v1_snapshot):
    if detect_host_kind() != "kvm_pvm":
        pytest.skip("the version 1 fixture was taken on a kvm_pvm host")
    directory, disk = v1_snapshot
    saved = read_document(directory).vcpus[0].regs.rbx
    out = io.BytesIO()
    with build_from_snapshot(directory, stdout=out, disks=[DiskSpec(str(disk))]) as machine:
        assert machine.vm.vcpus[0].call(lambda v: v.get_regs().rbx) == saved
        machine.vm.start()
        deadline = time.monotonic() + 60
        while len(out.getvalue()) < 8:
            assert time.monotonic() < deadline, "the restored guest printed nothing"
            time.sleep(0.02)
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
        assert int.from_bytes(machine.memory.read(COUNTER_ADDR, 4), "little") > saved
    text = out.getvalue()
    assert text[0] == ord("a") + (saved + 1) % 16      # the count goes on where it was


# --- the builder ----------------------------------------------------------------------------------
@needs_kvm
def test_built_for_boot_snapshotted_and_built_from_the_snapshot(counting_guest, tmp_path):
    config = MachineConfig(flat=counting_guest, mem_size=layout.MIN_MEM_SIZE + 0x10000)
    out = io.BytesIO()
    with build_for_boot(config, stdout=out) as machine:
        assert machine.memory.read(layout.FLAT_LOAD_ADDR, 2) == counting_guest.read_bytes()[:2]
        machine.vm.start()
        while len(out.getvalue()) < 10:
            time.sleep(0.02)
        machine.vm.pause()
        save_snapshot(machine, tmp_path / "snap")
        count = machine.vm.vcpus[0].call(lambda v: v.get_regs().rbx)
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
    state = json.loads((tmp_path / "snap" / "state.json").read_text())
    assert state["version"] == 2 and state["devices"]["serial@0x3f8"]["tag"] == "serial"
    assert "__type__" not in json.dumps(state)
    restored_out = io.BytesIO()
    with build_from_snapshot(tmp_path / "snap", stdout=restored_out, paused=True) as restored:
        assert restored.boot_info is None            # nothing was loaded: RAM is the snapshot's
        assert restored.vm.vcpus[0].call(lambda v: v.get_regs().rbx) == count
        restored.vm.start()
        time.sleep(0.2)
        assert restored.vm.state.value == "paused" and restored_out.getvalue() == b""
        restored.vm.resume()
        deadline = time.monotonic() + 60
        while not restored_out.getvalue():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        restored.vm.request_stop("user", 0, "test")
        restored.vm.wait()
    assert restored_out.getvalue()[0] == ord("a") + (count + 1) % 16


@needs_kvm
def test_build_for_boot_refuses_a_bad_config_before_creating_anything(counting_guest):
    import os
    before = len(os.listdir("/proc/self/fd"))
    for config, message in (
            (MachineConfig(flat=counting_guest, mem_size=4097), "not a multiple of 4 KiB"),
            (MachineConfig(flat=counting_guest, entry="unreal"), "--entry unreal"),
            (MachineConfig(flat=counting_guest, disks=["/etc/passwd"]),
             r"MachineConfig.disks: '/etc/passwd' is not a DiskSpec"),
            (MachineConfig(), "give exactly one of --flat FILE or --kernel FILE")):
        with pytest.raises(ConfigError) as caught:
            build_for_boot(config)
        one_line(caught.value, message)
    assert len(os.listdir("/proc/self/fd")) == before


@needs_kvm
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_every_device_a_config_can_ask_for_comes_back_as_it_was_saved(counting_guest, tmp_path,
                                                                        transport):
    """Disk, console, RNG, balloon and vsock on either transport: each part's state in
    state.json is typed and tagged, and the restored machine's parts give back exactly
    what was saved (before the guest runs again)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(flat=counting_guest, mem_size=layout.MIN_MEM_SIZE + 0x10000,
                           transport=transport, disks=[DiskSpec(str(disk))], console="virtio",
                           rng=True, balloon=True, balloon_stats_s=1, vsock_cid=3)
    snapshot_of_running(config, tmp_path / "snap")
    saved = json.loads((tmp_path / "snap" / "state.json").read_text())
    parts = list(saved["devices"].values())
    if transport == "pci":
        parts += [slot["device"] for slot in saved["pci"]["slots"].values() if slot["device"]]
    tags = {part["tag"] for part in parts} | {(part.get("device") or {}).get("tag")
                                              for part in parts}
    assert {"virtio-blk", "virtio-balloon", "virtio-vsock", f"virtio-{transport}"} <= tags
    from pykvm.snapshot.snapshot import legacy_devices
    with build_from_snapshot(tmp_path / "snap", stdout=io.BytesIO(), trust=True) as restored:
        for key, device in legacy_devices(restored).items():
            assert device.save_state().to_json() == saved["devices"][key], key
        if transport == "pci":
            assert restored.virtio.pci.save_state().to_json() == saved["pci"]
