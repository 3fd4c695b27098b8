"""virtio-mmio (virtio 1.2, section 4.2) under real KVM: a flat guest
(tests/guests/hostile.S, ring 3) reads and writes the register pages as Linux's
virtio_mmio driver does -- 32-bit loads and stores, QueueNotify matched by an
ioeventfd -- against devices that attach_virtio(transport="mmio") put where
pykvm/layout.py says; and as a hostile driver does, which must end in NEEDS_RESET
with the VM alive and the device usable again after a reset.
"""

from __future__ import annotations

import io
import os
import struct

import pytest

from pykvm import layout
from pykvm.devices.virtio.device import VIRTIO_F_VERSION_1
from pykvm.devices.virtio.driver import DriverRing
from pykvm.memory import GuestMemory

from ..logs import pykvm_warnings
from .test_hostile_guest import CMD_ADDR, FlatGuest, MmioDriverScript, wait_until

GUEST_MEM = 64 << 20
BASE = layout.VIRTIO_MMIO_START
BLK, RNG = BASE, BASE + layout.VIRTIO_MMIO_SLOT        # the order attach_virtio puts them in
RINGS = 0x400000
DATA = 0x600000
QSIZE = 16
NEEDS_RESET = 0x40
SECTORS = 64
# Registers (4.2.2)
MAGIC, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x080, 0x090, 0x0A0
SHM_LEN_LOW, CONFIG_GENERATION, CONFIG = 0x0B0, 0x0FC, 0x100


class MmioScript(MmioDriverScript):
    """MmioDriverScript with reads by register and a queue set up on a DriverRing."""

    def get(self, offset: int, width: int = 4) -> int:
        return self.load(self.bar + offset, width)

    def ring(self, index: int, ring, *, size: int | None = None) -> None:
        self.queue(index, size=ring.size if size is None else size, desc=ring.desc_addr,
                   avail=ring.avail_addr, used=ring.used_addr)


@pytest.fixture
def rig(kvm, tmp_path):
    """A flat guest with a virtio-blk disk and a virtio-rng on virtio-mmio."""
    from pykvm.devices.virtio.attach import DiskSpec, attach_virtio

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(SECTORS * 512))
    memory = GuestMemory.anonymous(GUEST_MEM)
    guest = FlatGuest(kvm, memory)
    virtio = attach_virtio(guest.vm, memory, disks=[DiskSpec(str(image))], rng=True,
                           transport="mmio")
    guest.start()
    try:
        yield guest, virtio, image
    finally:
        guest.close()
        memory.close()


def test_devices_sit_where_the_layout_says_and_the_command_line_announces_them(rig):
    guest, virtio, _ = rig
    assert virtio.pci is None and [t.base for t in virtio.transports()] == [BLK, RNG]
    first, second = layout.VIRTIO_MMIO_IRQS[:2]
    assert virtio.cmdline() == (f"virtio_mmio.device=4K@0xd0000000:{first} "
                                f"virtio_mmio.device=4K@0xd0001000:{second}")


def test_register_file_reads_as_a_version_2_device(rig):
    guest, virtio, _ = rig
    script = MmioScript(BLK)
    reads = {name: script.get(offset) for name, offset in (
        ("magic", MAGIC), ("version", VERSION), ("device", DEVICE_ID), ("vendor", VENDOR_ID),
        ("shm_len", SHM_LEN_LOW), ("generation", CONFIG_GENERATION))}
    script.reg(DEVICE_FEATURES_SEL, 1)
    reads["features_high"] = script.get(DEVICE_FEATURES)
    script.reg(QUEUE_SEL, 0)
    reads["num_max"] = script.get(QUEUE_NUM_MAX)
    reads["ready"] = script.get(QUEUE_READY)
    script.reg(QUEUE_SEL, 7)                              # blk has one queue
    reads["num_max_absent"] = script.get(QUEUE_NUM_MAX)
    reads["capacity"] = script.get(CONFIG)                # virtio_blk_config.capacity, low half
    reads["magic_16bit"] = script.get(MAGIC, 2)           # not 32 bits wide: reads 0 (4.2.2.2)
    reads["rng_device"] = script.load(RNG + DEVICE_ID)
    values = guest.run(script)
    got = dict(zip(reads, (values[index] for index in reads.values())))
    assert got == {"magic": 0x74726976, "version": 2, "device": 2, "vendor": 0x554D4551,
                   "shm_len": 0xFFFFFFFF, "generation": 0, "features_high": 1,
                   "num_max": virtio.disks[0].queue_sizes[0], "ready": 0, "num_max_absent": 0,
                   "capacity": SECTORS, "magic_16bit": 0, "rng_device": 4}


def _negotiated(memory, base: int) -> tuple[DriverRing, MmioScript]:
    """A fresh queue-0 ring in RINGS and a script that has the device at ``base``
    negotiate its features (FEATURES_OK) and nothing more yet."""
    ring = DriverRing(memory, RINGS, QSIZE)
    script = MmioScript(base)
    script.negotiate()
    return ring, script


def _driver_ok(memory, base: int) -> tuple[DriverRing, MmioScript]:
    """:func:`_negotiated`, then the ring set up as queue 0 and DRIVER_OK written."""
    ring, script = _negotiated(memory, base)
    script.ring(0, ring)
    script.reg(STATUS, 0xF)
    return ring, script


def _blk_request(memory, ring: DriverRing, kind: int, sector: int, data_addr: int) -> None:
    memory.write(DATA, struct.pack("<IIQ", kind, 0, sector))
    memory.write(DATA + 0x2000, b"\xff")
    ring.add_chain([(DATA, 16, False), (data_addr, 512, kind == 0), (DATA + 0x2000, 1, True)])


def test_a_request_round_trip_over_the_ioeventfd_and_the_interrupt_status(rig):
    guest, virtio, image = rig
    memory = guest.memory
    transport = virtio.transports()[0]
    ring, setup = _driver_ok(memory, BLK)
    status = setup.get(STATUS)
    assert guest.run(setup)[status] == 0xF

    payload = b"over virtio-mmio".ljust(512, b".")
    memory.write(DATA + 0x1000, payload)
    _blk_request(memory, ring, 1, 5, DATA + 0x1000)       # write sector 5
    kick = MmioScript(BLK)
    kick.notify(0)                                        # one 32-bit store: the ioeventfd
    guest.run(kick)
    assert wait_until(lambda: ring.used_idx() == 1, 5.0)
    assert image.read_bytes()[5 * 512:6 * 512] == payload
    assert memory.read(DATA + 0x2000, 1) == b"\0"         # VIRTIO_BLK_S_OK

    memory.write(DATA + 0x3000, bytes(512))
    _blk_request(memory, ring, 0, 5, DATA + 0x3000)       # and read it back
    guest.run(kick)
    assert wait_until(lambda: ring.used_idx() == 2, 5.0)
    assert memory.read(DATA + 0x3000, 512) == payload
    assert transport.interrupts >= 1 and not transport.broken

    ack = MmioScript(BLK)
    before = ack.get(INTERRUPT_STATUS)
    ack.reg(INTERRUPT_ACK, 1)
    after = ack.get(INTERRUPT_STATUS)
    values = guest.run(ack)
    assert (values[before], values[after]) == (1, 0)
    assert guest.vm.stop_reason is None


class _Outside:
    """Ring registers pointing past the end of guest RAM."""
    size = QSIZE
    desc_addr = GUEST_MEM - 16
    avail_addr = RINGS + 0x1000
    used_addr = RINGS + 0x2000


# (name, what the hostile driver does after FEATURES_OK, on rng's queue 0)
HOSTILE = [
    ("queue size not a power of two", lambda s, r: s.ring(0, r, size=3)),
    ("queue size above QueueNumMax", lambda s, r: s.ring(0, r, size=1 << 16)),
    ("rings outside RAM", lambda s, r: s.ring(0, _Outside())),
    ("QueueNum after QueueReady", lambda s, r: (s.ring(0, r), s.reg(QUEUE_NUM, 8))),
    ("QueueDesc after QueueReady", lambda s, r: (s.ring(0, r), s.reg(QUEUE_DESC, DATA))),
    ("features after FEATURES_OK", lambda s, r: s.reg(DRIVER_FEATURES, 0)),
    ("status bits cleared", lambda s, r: s.reg(STATUS, 1)),
    ("DRIVER_OK without FEATURES_OK", lambda s, r: (s.reg(STATUS, 0), s.reg(STATUS, 1),
                                                    s.reg(STATUS, 7))),
    ("a buffer outside RAM", lambda s, r: (s.ring(0, r), s.reg(STATUS, 0xF),
                                           _publish(r, GUEST_MEM - 8, 64), s.notify(0))),
]


def _publish(ring: DriverRing, addr: int, length: int) -> None:
    ring.add_chain([(addr, length, True)])


@pytest.mark.parametrize("name,attack", HOSTILE, ids=[name for name, _ in HOSTILE])
def test_a_hostile_driver_gets_needs_reset_and_the_device_recovers(rig, name, attack, caplog):
    guest, virtio, _ = rig
    memory = guest.memory
    transport = virtio.transports()[1]
    ring, script = _negotiated(memory, RNG)
    attack(script, ring)
    guest.run(script)
    assert wait_until(lambda: transport.broken, 5.0), name
    check = MmioScript(RNG)
    status = check.get(STATUS)
    pending = check.get(INTERRUPT_STATUS)
    values = guest.run(check)
    assert values[status] & NEEDS_RESET, name
    assert values[pending] & 2, name                      # a configuration change: look
    assert any("device needs reset" in line for line in pykvm_warnings(caplog)), name
    assert not any("internal error" in line for line in pykvm_warnings(caplog)), name

    # The driver resets the device and it serves an ordinary request again.
    ring, again = _driver_ok(memory, RNG)
    status = again.get(STATUS)
    memory.write(DATA, bytes(64))
    _publish(ring, DATA, 64)
    again.notify(0)
    assert guest.run(again)[status] == 0xF
    assert wait_until(lambda: ring.used_idx() == 1, 5.0)
    assert memory.read(DATA, 64) != bytes(64)
    assert guest.vm.stop_reason is None


def test_a_vhost_user_device_gets_its_queues_at_driver_ok_over_mmio(tmp_path):
    """The front end of a vhost-user device (virtio-fs here) is transport-neutral: on
    virtio-mmio too the back end gets the rings at DRIVER_OK, its call eventfd becomes
    InterruptStatus bit 0 and an edge on the device's line, and a reset stops it."""
    from pykvm.devices.virtio.driver import MmioDriver, RecordingLine, StandInVm
    from pykvm.devices.virtio.fs import FsDevice
    from pykvm.devices.virtio.mmio import VirtioMmioDevice
    from pykvm.vhost_user.frontend import Frontend
    from pykvm.vhost_user.protocol import VRING_ADDR, Request

    from ..fakes import wait_for
    from ..unit.test_vhost_user import FakeBackend

    backend = FakeBackend(tmp_path / "backend.sock")
    memory = GuestMemory.anonymous(16 << 20)
    vm = StandInVm(memory)
    line = RecordingLine(6)
    device = FsDevice(Frontend.connect(str(tmp_path / "backend.sock"), "virtio-fs0"), "mytag")
    transport = VirtioMmioDevice(vm, memory, device, base=BASE, gsi=6, irq=line)
    driver = MmioDriver(transport)
    try:
        assert driver.read(DEVICE_ID) == 26
        assert driver.negotiate(VIRTIO_F_VERSION_1) == 0xB
        rings = [DriverRing(memory, 0x100000 + i * 0x10000, 128) for i in range(2)]
        for index, ring in enumerate(rings):
            driver.setup_queue(index, ring)
        before = len(backend.messages)
        driver.driver_ok()
        assert driver.status() == 0xF
        handed = backend.names()[before:]
        assert handed[:2] == ["SET_FEATURES", "SET_MEM_TABLE"]
        assert handed.count("SET_VRING_KICK") == 2
        addr = [m for m in backend.messages if m.request == Request.SET_VRING_ADDR][1]
        assert VRING_ADDR.unpack(addr.payload)[2] == memory.host_address(rings[1].desc_addr, 16)
        os.eventfd_write(backend.calls[1], 1)               # the back end used a buffer
        assert wait_for(lambda: driver.read(INTERRUPT_STATUS) == 1)
        assert line.triggered >= 1 and driver.acknowledge() == 1
        assert driver.read(INTERRUPT_STATUS) == 0
        driver.write(STATUS, 0)
        assert backend.names()[-2:] == ["GET_VRING_BASE", "GET_VRING_BASE"]
    finally:
        transport.close()
        vm.close()
        memory.close()
        backend.close()


# --- snapshots ------------------------------------------------------------------------------------
class MachineGuest(FlatGuest):
    """hostile.S in a whole Machine (built for boot, or from a snapshot): the same
    scripts, with the command register added to the machine's VM."""

    def __init__(self, machine):
        from ..command_register import CommandRegister
        self.memory, self.vm = machine.memory, machine.vm
        self.commands = CommandRegister("hostile-cmd")
        self.vm.add_mmio_device(CMD_ADDR, 0x1000, self.commands)


def test_a_snapshot_keeps_the_mmio_devices_state_and_the_guest_goes_on(kvm, tmp_path):
    """Snapshot a running flat guest with virtio-mmio devices between two requests, with
    an interrupt it has not acknowledged; in the restored machine the device is still
    DRIVER_OK on the same ring, InterruptStatus still says so, and the next request
    completes at used index 2."""
    import json

    from pykvm.devices.virtio.attach import DiskSpec
    from pykvm.machine import MachineConfig, build_for_boot, build_from_snapshot
    from pykvm.snapshot import save_snapshot

    from .test_hostile_guest import PARAMS, SCRIPT_ADDR, guest_image

    flat, image = tmp_path / "hostile.bin", tmp_path / "disk.img"
    flat.write_bytes(guest_image())
    image.write_bytes(bytes(SECTORS * 512))
    config = MachineConfig(flat=flat, entry="long", mem_size=GUEST_MEM, rng=True,
                           disks=[DiskSpec(str(image))], transport="mmio")
    with build_for_boot(config, stdout=io.BytesIO()) as machine:
        machine.memory.write_u64(PARAMS, SCRIPT_ADDR)
        machine.memory.write_u64(PARAMS + 8, CMD_ADDR)
        guest = MachineGuest(machine)
        machine.vm.start()
        ring, script = _driver_ok(machine.memory, RNG)
        _publish(ring, DATA, 32)
        script.notify(0)
        guest.run(script)
        assert wait_until(lambda: ring.used_idx() == 1, 5.0)
        machine.vm.pause()
        save_snapshot(machine, tmp_path / "snap")
        machine.vm.request_stop("user", 0, "test")
        machine.vm.wait()
    devices = json.loads((tmp_path / "snap" / "state.json").read_text())["devices"]
    assert devices[f"virtio-rng@{RNG:#x}"]["tag"] == "virtio-mmio"
    assert devices[f"virtio-blk0@{BLK:#x}"]["status"] == 0

    with build_from_snapshot(tmp_path / "snap", stdout=io.BytesIO(), trust=True) as restored:
        guest = MachineGuest(restored)
        restored.vm.start()
        memory = restored.memory
        memory.write(DATA + 0x100, bytes(32))
        ring.memory = memory                      # the same ring, in the restored RAM
        _publish(ring, DATA + 0x100, 32)
        check = MmioScript(RNG)
        status, pending = check.get(STATUS), check.get(INTERRUPT_STATUS)
        check.notify(0)
        values = guest.run(check)
        assert (values[status], values[pending]) == (0xF, 1)
        assert wait_until(lambda: ring.used_idx() == 2, 5.0)
        assert memory.read(DATA + 0x100, 32) != bytes(32)
        assert restored.virtio.transports()[1].interrupts >= 1
        restored.vm.request_stop("user", 0, "test")
        restored.vm.wait()


def test_closing_the_vm_closes_each_device_once_and_quietly(kvm, caplog):
    """The VM closes what is left on its MMIO bus after MmioDevices closed them: a second
    close must be a no-op (it once stopped a stopped worker: a warning per device)."""
    from pykvm.devices.virtio.attach import attach_virtio
    from pykvm.vstate.vm import Vm

    with GuestMemory.anonymous(GUEST_MEM) as memory:
        vm = Vm(kvm, memory)
        virtio = attach_virtio(vm, memory, rng=True, transport="mmio")
        worker = virtio.transports()[0].worker.thread
        with caplog.at_level("WARNING"):
            vm.close()
        assert not worker.is_alive()
        assert "closing devices" not in caplog.text


@pytest.mark.parametrize("transport,status", [("mmio", 4), ("pci", 1)])
def test_pykvm_run_transport_puts_the_rng_on_the_register_page(kvm, tmp_path, transport, status):
    """`pykvm run --transport mmio --rng`: a 32-bit flat guest finds "virt" and device ID
    4 at 0xd0000000 and exits with the ID; with --transport pci nothing is there."""
    import subprocess
    import sys

    from ..asm import assemble

    flat = tmp_path / "probe.bin"
    flat.write_bytes(assemble(f"""
        mov {BASE + MAGIC:#x}, %eax
        mov $1, %bl
        cmp $0x74726976, %eax
        jne 1f
        mov {BASE + DEVICE_ID:#x}, %ebx
    1:  mov %bl, %al
        mov ${layout.EXIT_PORT:#x}, %dx
        out %al, %dx
        hlt""", "protected", layout.FLAT_LOAD_ADDR))
    done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--flat", str(flat), "--entry",
                           "protected", "--rng", "--transport", transport],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
