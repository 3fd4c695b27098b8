"""Snapshots and the control socket.

Without Linux: a flat guest that counts resumes from the same count after a restore
(in-process and through the CLI and the control socket); each device's state round
trip; damaged, truncated, foreign and tampered snapshots are refused with one line.
Snapshots of Linux guests: tests/linux/test_linux_snapshot.py.
"""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykvm import layout
from pykvm.control import ControlServer, parse_command, request
from pykvm.devices.acpi_pm import AcpiPm
from pykvm.devices.i8042 import I8042
from pykvm.devices.pci.config import ConfigSpace
from pykvm.devices.pci.msix import CONTROL_ENABLE, MsixState, MsixTable
from pykvm.devices.rtc import Rtc, RtcState
from pykvm.devices.serial import Serial, SerialState
from pykvm.devices.virtio.device import VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing, PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.pci import VirtioPciDevice, VirtioPciState
from pykvm.devices.virtio.queue import Virtqueue
from pykvm.devices.virtio.rng import RngDevice
from pykvm.errors import ConfigError
from pykvm.machine import MachineConfig, build_for_boot
from pykvm.memory import GuestMemory
from pykvm.snapshot import SnapshotError, load_state, restore_machine, save_snapshot
from pykvm.snapshot.memfile import PAGE, memory_digest, nonzero_runs
from pykvm.snapshot.snapshot import checksum
from pykvm.snapshot.state import struct_from_json, struct_to_json

from ..asm import assemble
from ..conftest import needs_kvm

REPO = Path(__file__).resolve().parents[2]
COUNTER_OFFSET = 0x8000                          # from DS, which real mode sets to the load segment
COUNTER_ADDR = layout.FLAT_LOAD_ADDR + COUNTER_OFFSET


class FakeIrqLine:
    def __init__(self):
        self.levels = []

    def set_level(self, high):
        self.levels.append(bool(high))


# --- a flat guest that counts ---------------------------------------------------------------
@pytest.fixture(scope="module")
def counting_guest(tmp_path_factory):
    """Real mode: count in EBX and at COUNTER_ADDR, print 'a' + count % 16 on the serial
    port per count, with a short delay loop in between (ring 0: emulated on kvm_pvm)."""
    code = assemble(f"""
        xor %ebx, %ebx
        mov $0x3f8, %dx
    1:  inc %ebx
        mov %ebx, %ds:{COUNTER_OFFSET:#x}
        mov %bl, %al
        and $15, %al
        add $'a', %al
        out %al, %dx
        mov $3000, %ecx
    2:  loop 2b
        jmp 1b""")
    path = tmp_path_factory.mktemp("guest") / "count.bin"
    path.write_bytes(code)
    return path


def flat_config(path, **kwargs) -> MachineConfig:
    return MachineConfig(flat=path, mem_size=layout.MIN_MEM_SIZE + 0x10000, **kwargs)


def snapshot_of_running(config: MachineConfig, directory: Path, seconds: float = 0.2) -> None:
    """Boot ``config``, let the guest run ``seconds``, snapshot it into ``directory``, stop."""
    with build_for_boot(config, stdout=io.BytesIO()) as machine:
        machine.vm.start()
        time.sleep(seconds)
        save_snapshot(machine, directory)
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()


def wait_for_output(out: io.BytesIO, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(out.getvalue()) < count:
        assert time.monotonic() < deadline, f"guest printed {len(out.getvalue())} bytes"
        time.sleep(0.02)


def assert_counting(text: bytes, first: int) -> None:
    """``text`` is the guest's letters for counts first, first+1, ..."""
    expected = bytes(ord("a") + (first + i) % 16 for i in range(len(text)))
    assert text == expected


def ebx(machine) -> int:
    return machine.vm.vcpus[0].call(lambda v: v.get_regs().rbx)


@needs_kvm
def test_counting_guest_continues_from_the_snapshot(counting_guest, tmp_path):
    out = io.BytesIO()
    with build_for_boot(flat_config(counting_guest), stdout=out) as machine:
        machine.vm.start()
        wait_for_output(out, 20)
        info = save_snapshot(machine, tmp_path / "snap")     # pauses, snapshots, resumes
        assert machine.vm.state.value == "running"
        wait_for_output(out, len(out.getvalue()) + 5)        # it goes on after the snapshot
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
    saved_count = load_state(tmp_path / "snap").vcpus[0].regs.rbx
    assert saved_count >= 20
    assert info.mem_size == layout.MIN_MEM_SIZE + 0x10000
    assert info.memory_bytes < info.mem_size // 10              # sparse: code and counter

    for _ in range(2):                                          # twice from the same snapshot
        out2 = io.BytesIO()
        with restore_machine(tmp_path / "snap", stdout=out2) as restored:
            assert ebx(restored) == saved_count
            assert restored.memory.read_u32(COUNTER_ADDR) == saved_count
            restored.vm.start()
            wait_for_output(out2, 10)
            restored.vm.pause()
            count = ebx(restored)
            restored.serial.flush()
            printed = out2.getvalue()
            restored.vm.request_stop("user", 0, "test")
            restored.vm.wait()
        assert_counting(printed, saved_count + 1)
        assert count == saved_count + len(printed)


@needs_kvm
def test_snapshot_of_a_restored_vm_into_its_own_directory(counting_guest, tmp_path):
    """The restored VM's RAM is mapped from memory.bin: a new snapshot replaces the file
    (a new inode), never writes into the mapped one."""
    with build_for_boot(flat_config(counting_guest), stdout=io.BytesIO()) as machine:
        machine.vm.start()
        time.sleep(0.3)
        save_snapshot(machine, tmp_path / "snap")
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
    first = load_state(tmp_path / "snap").vcpus[0].regs.rbx
    with restore_machine(tmp_path / "snap", stdout=io.BytesIO()) as restored:
        restored.vm.start()
        time.sleep(0.3)
        save_snapshot(restored, tmp_path / "snap")
        restored.vm.pause()
        assert restored.memory.read_u32(COUNTER_ADDR) >= first
        restored.vm.request_stop("user", 0, "test")
        restored.vm.wait()
    second = load_state(tmp_path / "snap").vcpus[0].regs.rbx
    assert second >= first
    with restore_machine(tmp_path / "snap", stdout=io.BytesIO()) as again:
        assert again.memory.read_u32(COUNTER_ADDR) == second


@needs_kvm
def test_a_stopped_vm_is_not_snapshotted_and_a_restore_may_start_paused(counting_guest,
                                                                          tmp_path):
    with build_for_boot(flat_config(counting_guest), stdout=io.BytesIO()) as machine:
        machine.vm.start()
        time.sleep(0.1)
        save_snapshot(machine, tmp_path / "snap")
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
        with pytest.raises(SnapshotError, match="has stopped"):
            save_snapshot(machine, tmp_path / "late")
    out = io.BytesIO()
    with restore_machine(tmp_path / "snap", stdout=out, paused=True) as restored:
        restored.vm.start()
        time.sleep(0.3)
        assert restored.vm.state.value == "paused" and out.getvalue() == b""
        restored.vm.resume()
        wait_for_output(out, 3)
        restored.vm.request_stop("user", 0, "test")
        restored.vm.wait()


@needs_kvm
def test_a_tsc_deadline_timer_survives_the_restore(counting_guest, tmp_path):
    """Linux runs its LAPIC timer in TSC-deadline mode; KVM drops a deadline written
    before the LAPIC is in that mode, so a restore that lost it left the guest without
    a timer (it stalled the first time only the timer could wake it)."""
    from pykvm.ioctl import structs as s
    with build_for_boot(flat_config(counting_guest), stdout=io.BytesIO()) as machine:
        vcpu = machine.vm.vcpus[0]
        raw = bytearray(bytes(vcpu.get_lapic()))
        raw[0x320:0x324] = (0x400EC).to_bytes(4, "little")       # LVTT: TSC deadline, 0xEC
        vcpu.set_lapic(s.kvm_lapic_state.from_buffer_copy(bytes(raw)))
        deadline = vcpu.get_msrs([0x10])[0x10] + (1 << 50)
        vcpu.set_msrs({0x6E0: deadline})
        assert vcpu.get_msrs([0x6E0])[0x6E0] == deadline
        save_snapshot(machine, tmp_path / "snap")
    with restore_machine(tmp_path / "snap", stdout=io.BytesIO()) as restored:
        assert restored.vm.vcpus[0].get_msrs([0x6E0])[0x6E0] == deadline


@needs_kvm
def test_vcpu_and_vm_state_round_trip(counting_guest, tmp_path):
    with build_for_boot(flat_config(counting_guest, cpus=2), stdout=io.BytesIO()) as machine:
        machine.vm.start()
        time.sleep(0.2)
        save_snapshot(machine, tmp_path / "snap")
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
    saved = json.loads((tmp_path / "snap" / "state.json").read_text())
    with restore_machine(tmp_path / "snap", stdout=io.BytesIO()) as restored:
        for vcpu, state in zip(restored.vm.vcpus, saved["vcpus"]):
            again = vcpu.call(lambda v: v.save_state()).to_json()
            for key in ("regs", "sregs", "fpu", "lapic", "mp_state", "debugregs", "xcrs", "cpuid"):
                assert again[key] == state[key], key
            msrs = dict(state["msrs"])
            for index in ("0x10",):      # the TSC runs on
                assert again["msrs"].pop(index) >= msrs.pop(index)
            assert again["msrs"] == msrs
        vm_state = restored.vm.save_state().to_json()
        assert vm_state["irqchip"] == saved["vm"]["irqchip"]
        assert vm_state["pit"]["channels"][0]["mode"] == saved["vm"]["pit"]["channels"][0]["mode"]
        assert vm_state["clock"]["clock"] >= saved["vm"]["clock"]["clock"]
    assert saved["vcpus"][1]["mp_state"] != saved["vcpus"][0]["mp_state"]   # AP never started


# --- the CLI and the control socket -----------------------------------------------------------
def pykvm(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "pykvm", *args], env=env, cwd=str(REPO),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def ctl(sock, *words):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pykvm", "ctl", str(sock), *words],
                            capture_output=True, text=True, env=env, timeout=120)
    return result.returncode, json.loads(result.stdout) if result.stdout else None, result.stderr


def wait_for_path(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@needs_kvm
def test_cli_snapshot_through_the_control_socket_and_restore(counting_guest, tmp_path):
    sock = tmp_path / "api.sock"
    process = pykvm("run", "--flat", str(counting_guest), "--mem", "2M", "--api-sock", str(sock))
    try:
        wait_for_path(sock)
        time.sleep(0.5)
        status, response, _ = ctl(sock, "status")
        assert status == 0 and response["ok"] and response["state"] == "running"
        assert response["vcpus"] == 1 and response["mem_size"] == 2 << 20
        assert ctl(sock, "pause")[1] == {"ok": True, "state": "paused"}
        status, response, _ = ctl(sock, "snapshot", str(tmp_path / "snap"))
        assert status == 0 and response["state"] == "paused"
        assert response["snapshot"]["disk_bytes"] < response["snapshot"]["mem_size"]
        status, response, _ = ctl(sock, "stats")
        assert response["vcpus"][0]["exits"]["io"] > 0
        assert ctl(sock, "stop")[1] == {"ok": True, "state": "stopping"}
        first_out, first_err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, first_err
    assert not sock.exists()                     # removed on exit
    assert_counting(first_out, 1)

    restored = pykvm("run", "--restore", str(tmp_path / "snap"), "--api-sock", str(sock))
    try:
        wait_for_path(sock)
        deadline = time.monotonic() + 30
        while ctl(sock, "stats")[1]["vcpus"][0]["exits"].get("io", 0) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ctl(sock, "stop")
        second_out, second_err = restored.communicate(timeout=60)
    finally:
        if restored.poll() is None:
            restored.kill()
            restored.communicate()
    assert restored.returncode == 0, second_err
    assert_counting(second_out, len(first_out) + 1)    # exactly where the first one paused


def test_ctl_without_a_server_is_one_line(tmp_path):
    status, _, err = ctl(tmp_path / "nothing.sock", "status")
    assert status != 0 and err.count("\n") == 1 and "no such control socket" in err


def test_ctl_arguments():
    assert parse_command(["status"]) == {"action": "status"}
    assert parse_command(["snapshot", "/tmp/x"]) == {"action": "snapshot", "path": "/tmp/x"}
    for words in ([], ["dance"], ["snapshot"], ["pause", "now"]):
        with pytest.raises(ConfigError):
            parse_command(words)


class _StandInMachine:
    """What ControlServer touches of a machine, without KVM."""

    class _Vm:
        stop_requested = False
        vcpus = []

        class state:
            value = "running"

        def request_stop(self, *args):
            self.stop_requested = True

    def __init__(self):
        self.vm = self._Vm()
        self.kvm = type("K", (), {"host_kind": "kvm_test"})()
        self.config = MachineConfig(flat=Path("/dev/null"))


def test_control_server_requests_and_errors(tmp_path):
    sock = tmp_path / "s"
    machine = _StandInMachine()
    with ControlServer(sock, machine) as server:
        assert request(sock, {"action": "status", "id": 7})["id"] == 7
        assert request(sock, {"action": "status"})["host_kind"] == "kvm_test"
        for bad, error in (({"action": "dance"}, "unknown action"),
                           ({"action": "snapshot"}, "needs a \"path\""),
                           ([1, 2], "JSON object")):
            response = request(sock, bad)
            assert response["ok"] is False and error in response["error"]
        assert "not a JSON request" in server.handle_line(b"{nope\n")["error"]
        with pytest.raises(ConfigError, match="another process serves"):
            ControlServer(sock, machine)
        assert request(sock, {"action": "stop"})["state"] == "stopping"
        wait_until(lambda: machine.vm.stop_requested)     # right after the response
    assert not sock.exists()


def test_control_socket_replaces_a_stale_socket_and_refuses_other_files(tmp_path):
    import socket as sockets
    stale = tmp_path / "stale"
    leftover = sockets.socket(sockets.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()                        # the file stays, nobody listens
    with ControlServer(stale, _StandInMachine()):
        assert request(stale, {"action": "status"})["ok"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(plain, _StandInMachine())


# --- refusals -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory, counting_guest):
    if not Path("/dev/kvm").exists():
        pytest.skip("needs /dev/kvm")
    where = tmp_path_factory.mktemp("good")
    image = where / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    config = flat_config(counting_guest, rng=True)
    from pykvm.devices.virtio import DiskSpec
    config.disks = [DiskSpec(str(image))]
    snapshot_of_running(config, where / "snap")
    return where / "snap", image


@pytest.fixture
def snapshot_copy(good_snapshot, tmp_path):
    source, image = good_snapshot
    target = tmp_path / "snap"
    shutil.copytree(source, target)
    return target, image


def rewrite(directory: Path, change, *, fix_checksum: bool) -> None:
    """Change state.json with ``change(document)``, keeping the checksum right if asked."""
    document = json.loads((directory / "state.json").read_text())
    change(document)
    if fix_checksum:
        document["checksum"] = checksum(document)
    (directory / "state.json").write_text(json.dumps(document))


def refused(directory, match: str) -> str:
    with pytest.raises(SnapshotError) as caught:
        with restore_machine(directory, stdout=io.BytesIO(), trust=True):
            pass
    message = str(caught.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def test_a_good_snapshot_restores(snapshot_copy):
    from pykvm.devices.virtio import DiskSpec
    directory, image = snapshot_copy
    with restore_machine(directory, stdout=io.BytesIO(), disks=[DiskSpec(str(image))]) as machine:
        assert machine.virtio is not None and len(machine.virtio.functions) == 2


def test_state_file_missing_or_not_json(snapshot_copy):
    directory, _ = snapshot_copy
    text = (directory / "state.json").read_text()
    (directory / "state.json").write_text(text[:len(text) // 2])
    refused(directory, "not valid JSON.*truncated or damaged")
    (directory / "state.json").unlink()
    refused(directory, "not a pykvm snapshot")
    refused(directory / "nowhere", "no such snapshot directory")


def test_checksum_mismatch(snapshot_copy):
    directory, _ = snapshot_copy
    rewrite(directory, lambda d: d["vcpus"][0]["regs"].update(rip=0), fix_checksum=False)
    refused(directory, "checksum mismatch")


def test_other_format_version(snapshot_copy):
    directory, _ = snapshot_copy
    for version in (3, 0, "2"):
        rewrite(directory, lambda d: d.update(version=version), fix_checksum=True)
        refused(directory, f"format version {version}; this pykvm .* reads versions 1 "
                           f"\\(converted\\) and 2$")


def test_other_host_kind(snapshot_copy):
    directory, _ = snapshot_copy
    rewrite(directory, lambda d: d.update(host_kind="kvm_other"), fix_checksum=True)
    refused(directory, "kvm_other host.*same kind of KVM")


def test_missing_keys(snapshot_copy):
    directory, _ = snapshot_copy
    rewrite(directory, lambda d: d.pop("devices"), fix_checksum=True)
    refused(directory, "missing devices")
    rewrite(directory, lambda d: d.update(devices={}) or d["vcpus"][0].pop("lapic"),
            fix_checksum=True)
    refused(directory, r"vcpus\[0\]: missing lapic")


def test_memory_file_truncated_missing_or_changed(snapshot_copy):
    directory, _ = snapshot_copy
    memory = directory / "memory.bin"
    data = bytearray(memory.read_bytes())
    data[layout.FLAT_LOAD_ADDR] ^= 0xFF          # the guest's first instruction byte
    memory.write_bytes(data)
    refused(directory, "memory.bin: checksum mismatch")
    memory.write_bytes(data[:-4096])
    refused(directory, "memory.bin: .* bytes, the snapshot says .*truncated")
    memory.unlink()
    refused(directory, "memory.bin: missing")


def test_missing_or_changed_disk_image(snapshot_copy):
    directory, image = snapshot_copy
    moved = image.with_name("moved.img")
    image.rename(moved)
    try:
        refused(directory, "disk image of the snapshot is missing")
        with open(image, "wb") as other:
            other.truncate(2 << 20)
        refused(directory, "it was changed")
    finally:
        moved.replace(image)


def test_cli_refusals_are_one_line(snapshot_copy, tmp_path):
    directory, _ = snapshot_copy
    rewrite(directory, lambda d: d.update(version=99), fix_checksum=True)
    process = pykvm("run", "--restore", str(directory))
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert err.decode().count("\n") == 1 and err.startswith(b"pykvm: error: ")
    process = pykvm("run", "--restore", str(directory), "--kernel", "/x", "--mem", "1G")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and b"drop --kernel, --mem" in err


# --- the memory file ---------------------------------------------------------------------------
def test_memory_file_is_sparse_and_its_digest_ignores_holes(tmp_path):
    from pykvm.snapshot.memfile import write_memory
    with GuestMemory.anonymous(64 << 20) as memory:
        memory.write(0x1000, b"x" * 10)
        memory.write(0x2000, b"y")
        memory.write((64 << 20) - PAGE, b"z")
        fd = os.open(tmp_path / "m.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            section = write_memory(memory, fd)
        finally:
            os.close(fd)
    assert section["data_bytes"] == 3 * PAGE
    assert section["disk_bytes"] < 1 << 20
    regions = [(0, 64 << 20)]
    assert memory_digest(str(tmp_path / "m.bin"), regions) == section["sha256"]
    dense = tmp_path / "dense.bin"
    subprocess.run(["cp", "--sparse=never", str(tmp_path / "m.bin"), str(dense)], check=True)
    assert os.stat(dense).st_blocks * 512 >= 64 << 20
    assert memory_digest(str(dense), regions) == section["sha256"]


def test_nonzero_runs():
    data = bytearray(20 * PAGE)
    for page in (1, 2, 3, 17, 19):
        data[page * PAGE + 100] = 1
    assert list(nonzero_runs(data)) == [(PAGE, 3 * PAGE), (17 * PAGE, PAGE), (19 * PAGE, PAGE)]


# --- device state round trips (no KVM) -----------------------------------------------------------
def test_struct_json_round_trip():
    from pykvm.ioctl import structs as s
    sregs = s.kvm_sregs()
    sregs.cs.selector, sregs.cr0, sregs.interrupt_bitmap[2] = 0x10, 0x80000011, 1 << 63
    data = struct_to_json(sregs)
    assert json.loads(json.dumps(data)) == data
    assert bytes(struct_from_json(s.kvm_sregs, data)) == bytes(sregs)
    lapic = s.kvm_lapic_state.from_buffer_copy(bytes(range(256)) * 4)
    assert bytes(struct_from_json(s.kvm_lapic_state, struct_to_json(lapic))) == bytes(lapic)
    del data["cr4"]
    with pytest.raises(KeyError):
        struct_from_json(s.kvm_sregs, data)


def test_serial_state_round_trip():
    line = FakeIrqLine()
    serial = Serial(line, io.BytesIO(), flush_delay=None)
    serial.write(3, 1, 0x83)                  # DLAB
    serial.write(0, 1, 0x01)                  # divisor 1
    serial.write(3, 1, 0x03)                  # 8N1
    serial.write(2, 1, 0xC7)                  # FIFO on, trigger 14
    serial.write(4, 1, 0x0B)                  # DTR RTS OUT2
    serial.write(1, 1, 0x01)                  # receive interrupts
    serial.write(7, 1, 0x5A)
    serial.receive(b"typed-ahead-input-longer-than-16")
    assert line.levels[-1] is True
    state = serial.save_state()
    assert SerialState.from_json(json.loads(json.dumps(state.to_json())), "serial") == state

    other_line = FakeIrqLine()
    other = Serial(other_line, io.BytesIO(), flush_delay=None)
    other.restore_state(state)
    assert other.save_state() == state
    assert other_line.levels == [True]         # the line the UART held high, raised again
    assert other.baud == 115200 and other.read(7, 1) == 0x5A
    received = bytes(other.read(0, 1) for _ in range(32))
    assert received == b"typed-ahead-input-longer-than-16"


def test_rtc_state_round_trip():
    now = [1_700_000_000.0]
    clock = Rtc(clock=lambda: now[0])
    clock.write(0, 1, 0x0B)
    clock.write(1, 1, 0x86)                   # SET, binary, 24 h
    clock.write(0, 1, 0x09)
    clock.write(1, 1, 30)                     # year 30
    clock.write(0, 1, 0x0B)
    clock.write(1, 1, 0x06)                   # SET cleared: the new time runs
    clock.write(0, 1, 0x40)
    clock.write(1, 1, 0x99)                   # CMOS RAM
    state = clock.save_state()
    now[0] += 3600
    other = Rtc(clock=lambda: now[0])
    other.restore_state(RtcState.from_json(json.loads(json.dumps(state.to_json())), "rtc"))
    assert other.save_state() == state
    other.write(0, 1, 0x40)
    assert other.read(1, 1) == 0x99
    other.write(0, 1, 0x09)
    assert other.read(1, 1) == 30             # the guest's year, an hour later
    with pytest.raises(SnapshotError, match="rtc.cmos: 3 bytes, not 128"):
        RtcState.from_json(dict(state.to_json(), cmos="AAAA"), "rtc")


def test_i8042_state_round_trip():
    controller = I8042(lambda: None)
    controller.write(4, 1, 0x60)              # write command byte ...
    state_pending = controller.save_state()
    assert state_pending.pending_command == 0x60
    other = I8042(lambda: None)
    other.restore_state(state_pending)
    other.write(0, 1, 0x47)                   # ... its parameter, after the restore
    other.write(4, 1, 0x20)
    assert other.read(0, 1) == 0x47
    kbd = FakeIrqLine()
    third = I8042(lambda: None, kbd_irq=kbd)
    third.restore_state(dataclasses.replace(other.save_state(), data_full=True, data=0x55))
    assert kbd.levels == [True] and third.read(4, 1) & 1 and third.read(0, 1) == 0x55


def test_acpi_pm_state_round_trip():
    pm = AcpiPm(lambda: None)
    pm.write(2, 2, 0x0121)
    pm.write(4, 1, 0x01)
    other = AcpiPm(lambda: None)
    other.restore_state(pm.save_state())
    assert other.save_state() == pm.save_state() and other.read(2, 2) == 0x0121


def test_pci_config_and_msix_state_round_trip():
    def build():
        config = ConfigSpace(vendor_id=0x1AF4, device_id=0x1044, class_code=0xFF0000)
        lines = [RecordingLine(24 + i) for i in range(3)]
        return config, MsixTable(None, config, 3, 0, 0x4000, 0x5000, interrupt_lines=lines), lines
    config, msix, lines = build()
    config.write(msix.offset + 2, 2, CONTROL_ENABLE)
    msix.write(16 + 8, 4, 0x41)                # vector 1: data
    msix.write(16 + 12, 4, 1)                  # masked ...
    msix.notify(1)                             # ... so this one is pending
    config.write(0x3C, 1, 11)
    saved_config, saved_msix = config.save_state(), msix.save_state()
    assert saved_msix.pending == (1,)

    config2, msix2, lines2 = build()
    config2.restore_state(saved_config)
    msix2.restore_state(MsixState.from_json(json.loads(json.dumps(saved_msix.to_json())), "msix"))
    assert config2.read(0x3C, 1) == 11 and msix2.enabled
    assert msix2.entry(1) == (0, 0x41, True) and msix2.pending(1)
    msix2.write(16 + 12, 4, 0)                 # unmasked: the pending interrupt goes out
    assert lines2[1].triggered == 1
    other_device = ConfigSpace(vendor_id=0x1234, device_id=1, class_code=0)
    with pytest.raises(SnapshotError, match="PCI config space of device 1044 given to 0001"):
        other_device.restore_state(saved_config)


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_virtqueue_and_virtio_transport_state_round_trip():
    """A driver uses virtio-rng, the transport is saved, a second transport over the same
    RAM restores it, and the driver's next request is served on the same ring."""
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        lines = [RecordingLine(24 + i) for i in range(2)]
        function = VirtioPciDevice(vm, memory, RngDevice(lambda n: b"\x5a" * n),
                                   interrupt_lines=lines)
        ring = DriverRing(memory, 0x100000, 8)
        driver = PciDriver(function)
        driver.negotiate(VIRTIO_F_VERSION_1)
        driver.setup_queue(0, ring, vector=0)
        driver.driver_ok()
        ring.add_chain([(0x200000, 16, True)])
        driver.notify(0)
        wait_until(lambda: ring.used_idx() == 1)
        assert memory.read(0x200000, 16) == b"\x5a" * 16
        with function.quiesced():
            state = function.save_state()
        function.close()
        vm.close()
        assert state.queues[0].active and state.queues[0].used_idx == 1

        vm2 = StandInVm(memory)
        function2 = VirtioPciDevice(vm2, memory, RngDevice(lambda n: b"\xa5" * n),
                                    interrupt_lines=[RecordingLine(24 + i) for i in range(2)])
        function2.restore_state(VirtioPciState.from_json(json.loads(json.dumps(state.to_json())),
                                                         "pci.slots.1.device"))
        assert function2.running and PciDriver(function2).status() == state.status
        queue: Virtqueue = function2.queues[0]
        assert (queue.last_avail_idx, queue.used_idx, queue.desc_addr) == \
            (1, 1, ring.desc_addr)
        ring.add_chain([(0x200000, 16, True)])
        PciDriver(function2).notify(0)
        wait_until(lambda: ring.used_idx() == 2)
        assert memory.read(0x200000, 16) == b"\xa5" * 16
        function2.close()
        vm2.close()
