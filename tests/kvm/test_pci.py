"""PCI: config space masks, BAR sizing, the capability list, MSI-X, conf1, GSI
routing; and the virtio-pci transport's registers. The conf1 and routing
tests at the end use real KVM (a tiny flat guest does the port I/O)."""

import struct

import pytest

from pykvm import layout
from pykvm.devices.pci.bus import PciBus
from pykvm.devices.pci.config import (BAR0, CAPABILITIES_POINTER, COMMAND, COMMAND_MEMORY,
                                      STATUS, STATUS_CAPABILITIES, Bar, ConfigSpace)
from pykvm.devices.pci.device import PciDevice
from pykvm.devices.pci.msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK, MsixTable
from pykvm.devices.virtio.device import (STATUS_FEATURES_OK, VIRTIO_F_RING_EVENT_IDX,
                                         VIRTIO_F_VERSION_1)
from pykvm.devices.virtio.driver import PciDriver, RecordingLine, StandInVm
from pykvm.devices.virtio.pci import VirtioPciDevice
from pykvm.devices.virtio.rng import RngDevice
from pykvm.memory import GuestMemory

from ..asm import assemble
from ..fakes import wait_for


def conf1_address(slot, register, function=0, bus=0):
    return 0x80000000 | bus << 16 | slot << 11 | function << 8 | register


@pytest.fixture
def stand_in():
    with GuestMemory.anonymous(16 << 20) as memory:
        vm = StandInVm(memory)
        yield vm
        vm.close()


def simple_config():
    return ConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0x018000, revision=2)


# --- config space ----------------------------------------------------------------------------
def test_identity_registers_are_read_only():
    config = simple_config()
    config.write(0, 4, 0xFFFFFFFF)
    config.write(0x08, 4, 0)
    assert config.read(0, 4) == 0x56781234
    assert config.read(0x08, 4) == 0x01800002


def test_command_keeps_only_defined_bits_and_status_errors_clear_on_write_one():
    config = simple_config()
    config.write(COMMAND, 2, 0xFFFF)
    assert config.read(COMMAND, 2) == 0x0547
    config.set(STATUS, 2, 0x8000 | STATUS_CAPABILITIES)
    config.write(STATUS, 2, 0x8000)
    assert config.read(STATUS, 2) == STATUS_CAPABILITIES


@pytest.mark.parametrize("size", [0x1000, 0x8000, 1 << 20])
def test_bar_sizing_reads_back_the_size_mask(size):
    config = simple_config()
    bar = Bar(0, size)
    config.add_bar(bar)
    config.set_bar_address(bar, 0xC0000000)
    config.write(BAR0, 4, 0xFFFFFFFF)
    assert config.read(BAR0, 4) == (~(size - 1)) & 0xFFFFFFFF
    config.write(BAR0, 4, 0xC0000000)
    assert config.bar_address(bar) == 0xC0000000


def test_64bit_bar_sizing_uses_both_dwords():
    config = simple_config()
    bar = Bar(2, 1 << 33, is_64bit=True, prefetchable=True)
    config.add_bar(bar)
    config.write(BAR0 + 8, 4, 0xFFFFFFFF)
    config.write(BAR0 + 12, 4, 0xFFFFFFFF)
    assert config.read(BAR0 + 8, 4) == 0x0000000C      # 64-bit, prefetchable, no low address bits
    assert config.read(BAR0 + 12, 4) == 0xFFFFFFFE     # size 8 GiB
    with pytest.raises(Exception):
        config.add_bar(Bar(3, 0x1000))                 # slot 3 is the upper half of BAR 2


def test_unused_bars_read_zero_and_ignore_writes():
    config = simple_config()
    config.write(BAR0 + 4, 4, 0xFFFFFFFF)
    assert config.read(BAR0 + 4, 4) == 0


def test_capability_list_walk():
    config = simple_config()
    first = config.add_capability(0x09, bytes(14))
    second = config.add_capability(0x11, bytes(10))
    assert config.read(STATUS, 2) & STATUS_CAPABILITIES
    assert config.read(CAPABILITIES_POINTER, 1) == first == 0x40
    assert config.capability_offsets() == [(0x09, first), (0x11, second)]
    assert config.read(second + 1, 1) == 0   # end of list
    assert second % 4 == 0


def test_out_of_range_accesses_are_harmless():
    config = simple_config()
    assert config.read(255, 4) == 0xFFFFFFFF
    config.write(254, 4, 0xFFFFFFFF)


# --- MSI-X ------------------------------------------------------------------------------------
def make_msix(vectors=3):
    config = simple_config()
    lines = [RecordingLine(gsi=24 + i) for i in range(vectors)]
    msix = MsixTable(None, config, vectors, 0, 0x4000, 0x5000, interrupt_lines=lines)
    return config, msix, lines


def test_msix_capability_describes_table_and_pba():
    config, msix, _ = make_msix(3)
    assert config.capability_offsets() == [(0x11, msix.offset)]
    control, table, pba = struct.unpack("<HII", bytes(config.data[msix.offset + 2:msix.offset + 12]))
    assert control == 2 and table == 0x4000 and pba == 0x5000
    assert msix.entry(0)[2] is True  # vectors start masked


def test_msix_table_writes_and_delivery():
    config, msix, lines = make_msix(3)
    assert msix.notify(1) is False                       # MSI-X still disabled
    config.write(msix.offset + 2, 2, CONTROL_ENABLE)
    msix.write(16 + 0, 4, 0xFEE00000)
    msix.write(16 + 8, 4, 0x41)
    assert msix.read(16 + 8, 4) == 0x41
    assert msix.notify(1) and lines[1].triggered == 0    # masked: pending instead
    assert msix.read_pba(0, 8) == 0b010
    msix.write(16 + 12, 4, 0)                            # unmask -> the pending one fires
    assert lines[1].triggered == 1 and msix.read_pba(0, 8) == 0
    assert msix.entry(1) == (0xFEE00000, 0x41, False)
    msix.notify(1)
    assert lines[1].triggered == 2
    config.write(msix.offset + 2, 2, CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
    msix.notify(1)
    assert lines[1].triggered == 2 and msix.pending(1)
    config.write(msix.offset + 2, 2, CONTROL_ENABLE)     # function unmask delivers
    assert lines[1].triggered == 3
    assert msix.notify(7) is False                       # no such vector


def test_msix_ignores_accesses_across_entries_and_outside_the_table():
    _, msix, _ = make_msix(2)
    msix.write(12, 8, 0)       # straddles entries 0 and 1
    assert msix.entry(0)[2] and msix.entry(1)[2]
    msix.write(1 << 20, 4, 0)
    assert msix.read(1 << 20, 4) == 0


# --- the bus, with a stand-in VM ---------------------------------------------------------------
class Probe(PciDevice):
    name = "probe"

    def __init__(self):
        super().__init__(simple_config())
        self.config.add_bar(Bar(0, 0x2000))
        from pykvm.bus import Device
        self.bar_devices[0] = Device()
        self.events = []

    def bar_mapped(self, index, address):
        self.events.append(("map", address))

    def bar_unmapped(self, index, address):
        self.events.append(("unmap", address))


def test_conf1_reaches_host_bridge_and_devices(stand_in):
    bus = PciBus(stand_in)
    slot = bus.add(Probe())
    assert slot == 1
    stand_in.pio_write(0xCF8, 4, conf1_address(0, 0))
    assert stand_in.pio_read(0xCF8, 4) == conf1_address(0, 0)
    assert stand_in.pio_read(0xCFC, 4) == 0x00081B36
    assert stand_in.pio_read(0xCFE, 2) == 0x0008             # a word at 0xCFE
    stand_in.pio_write(0xCF8, 4, conf1_address(0, 0x08))
    assert stand_in.pio_read(0xCFF, 1) == 0x06               # host bridge class
    stand_in.pio_write(0xCF8, 4, conf1_address(1, 0))
    assert stand_in.pio_read(0xCFC, 4) == 0x56781234
    for address in (conf1_address(2, 0), conf1_address(1, 0, function=1),
                    conf1_address(1, 0, bus=1), conf1_address(1, 0) & 0x7FFFFFFF):
        stand_in.pio_write(0xCF8, 4, address)
        assert stand_in.pio_read(0xCFC, 4) == 0xFFFFFFFF     # nobody answers
    # Linux's type-1 probe: a byte write to 0xCFB must not touch the address register.
    stand_in.pio_write(0xCF8, 4, conf1_address(1, 0))
    stand_in.pio_write(0xCFB, 1, 0x01)
    assert stand_in.pio_read(0xCF8, 4) == conf1_address(1, 0)


def test_bars_are_preassigned_and_follow_decode_and_moves(stand_in, caplog):
    bus = PciBus(stand_in)
    probe = Probe()
    slot = bus.add(probe)
    address = bus.bar_address(slot, 0)
    assert layout.PCI_MMIO_START <= address < layout.PCI_MMIO_START + layout.PCI_MMIO_SIZE
    assert address % 0x2000 == 0 and probe.config.command & COMMAND_MEMORY
    assert probe.events == [("map", address)]
    assert stand_in.mmio_bus.find(address).device is probe.bar_devices[0]

    def cfg_write(register, size, value):
        stand_in.pio_write(0xCF8, 4, conf1_address(slot, register & ~3))
        stand_in.pio_write(0xCFC + (register & 3), size, value)

    cfg_write(COMMAND, 2, 0)                     # Linux sizes BARs with decoding off
    cfg_write(BAR0, 4, 0xFFFFFFFF)
    assert stand_in.mmio_bus.find(address) is None
    cfg_write(BAR0, 4, 0xD0000000)
    cfg_write(COMMAND, 2, COMMAND_MEMORY)
    assert bus.bar_address(slot, 0) == 0xD0000000
    assert probe.events == [("map", address), ("unmap", address), ("map", 0xD0000000)]
    cfg_write(BAR0, 4, 0x1000)                   # onto guest RAM: refused, stays unmapped
    assert bus.bar_address(slot, 0) is None
    cfg_write(BAR0, 4, 0xD0000000)
    assert bus.bar_address(slot, 0) == 0xD0000000
    other = Probe()
    other_slot = bus.add(other)
    stand_in.pio_write(0xCF8, 4, conf1_address(other_slot, BAR0))
    stand_in.pio_write(0xCFC, 4, 0xD0000000)     # onto the first probe's BAR: not mapped,
    assert bus.bar_address(other_slot, 0) is None  # and the bus logs why (one warning)
    warned = [r.getMessage() for r in caplog.records if r.name == "pykvm.devices.pci.bus"]
    assert len(warned) == 1 and warned[0].startswith("probe: BAR 0 at 0xd0000000 not mapped: "), \
        warned


def test_intx_line_is_given_from_the_pci_irq_range(stand_in):
    bus = PciBus(stand_in)
    probe = Probe()
    probe.config.set(0x3D, 1, 1)
    bus.add(probe)
    gsi = probe.config.read(0x3C, 1)
    assert gsi in layout.PCI_INTX_GSIS
    probe.intx.set_level(True)
    assert stand_in.lines[gsi].level


def test_shared_intx_line_is_a_wired_or():
    from pykvm.interrupts import SharedLevelLine

    line = RecordingLine(10)
    shared = SharedLevelLine(line)
    first, second = shared.source(), shared.source()
    first.set_level(True)
    second.set_level(True)
    first.set_level(False)
    assert line.level                      # the second device still holds it
    second.set_level(False)
    assert not line.level and line.triggered == 1


# --- virtio-pci transport registers ------------------------------------------------------------
@pytest.fixture
def rng_function(stand_in):
    lines = [RecordingLine(24 + i) for i in range(2)]
    function = VirtioPciDevice(stand_in, stand_in.memory, RngDevice(), interrupt_lines=lines)
    yield function, lines
    function.close()


def test_virtio_pci_identity_and_capabilities(rng_function):
    function, _ = rng_function
    config = function.config
    assert config.read(0, 4) == 0x10441AF4 and config.read(0x08, 1) == 1
    kinds = []
    for cap_id, offset in config.capability_offsets():
        if cap_id == 0x09:
            cap_len, cfg_type, bar = config.read(offset + 2, 1), config.read(offset + 3, 1), \
                config.read(offset + 4, 1)
            kinds.append((cfg_type, bar, config.read(offset + 8, 4), config.read(offset + 12, 4)))
            if cfg_type == 2:
                assert cap_len == 20 and config.read(offset + 16, 4) == 4
    assert [k[0] for k in kinds] == [1, 3, 4, 2]
    assert (0x11, function.msix.offset) in config.capability_offsets()


def test_feature_negotiation_requires_version_1(rng_function):
    function, _ = rng_function
    driver = PciDriver(function)
    offered = driver.device_features()
    assert offered & VIRTIO_F_VERSION_1 and offered & VIRTIO_F_RING_EVENT_IDX
    assert not driver.negotiate(0) & STATUS_FEATURES_OK                   # legacy driver
    assert not driver.negotiate(VIRTIO_F_VERSION_1 | 1 << 40) & STATUS_FEATURES_OK  # not offered
    assert driver.negotiate(VIRTIO_F_VERSION_1) & STATUS_FEATURES_OK


def test_queue_registers_and_vectors(rng_function):
    function, _ = rng_function
    driver = PciDriver(function)
    assert driver.read(0x12, 2) == 1                     # num_queues
    driver.write(0x16, 2, 0)
    assert driver.read(0x18, 2) == 64
    driver.write(0x1A, 2, 1)
    assert driver.read(0x1A, 2) == 1
    driver.write(0x1A, 2, 9)                             # no such vector
    assert driver.read(0x1A, 2) == 0xFFFF
    driver.write(0x20, 4, 0x12345000)
    driver.write(0x24, 4, 0x1)
    assert driver.read(0x20, 8) == 0x112345000
    driver.write(0x16, 2, 5)                             # no such queue
    assert driver.read(0x18, 2) == 0


# --- real KVM: conf1 through the guest's own port I/O, and GSI routing --------------------------
def test_conf1_from_a_guest(kvm):
    from pykvm.vstate.vm import Vm
    from pykvm.boot.modes import set_mode

    class Sink:
        name = "sink"

        def __init__(self):
            self.values = []

        def write(self, offset, size, value):
            self.values.append(value)
            if len(self.values) == 3:
                vm.request_stop("exit", 0, "done")

        def read(self, offset, size):
            return 0

    def conf1_read_to_port_80(address: int, read: str = "mov $0xcfc, %dx\n in %dx, %eax"):
        """Select ``address`` at 0xcf8, run ``read`` (it leaves the value in %eax), and
        write %eax to the sink at port 0x80."""
        return f"""
        mov $0xcf8, %dx
        mov ${address:#x}, %eax
        out %eax, %dx
        {read}
        mov $0x80, %dx
        out %eax, %dx"""

    code = assemble(conf1_read_to_port_80(conf1_address(0, 0))
                    + conf1_read_to_port_80(conf1_address(1, 0))
                    + conf1_read_to_port_80(conf1_address(0, 0x08),        # 16 bits at 0xcfe
                                            "xor %eax, %eax\n mov $0xcfe, %dx\n in %dx, %ax")
                    + "\n hlt", "protected", origin=layout.FLAT_LOAD_ADDR)
    with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        sink = Sink()
        vm.add_pio_device(0x80, 4, sink)
        bus = PciBus(vm)
        bus.add(VirtioPciDevice(vm, memory, RngDevice()))
        memory.write(layout.FLAT_LOAD_ADDR, code)
        vm.create_vcpus(1)
        set_mode(vm.vcpus[0], memory, "protected", layout.FLAT_LOAD_ADDR)
        vm.run(timeout=20)
    assert sink.values == [0x00081B36, 0x10441AF4, 0x0600]


def test_msix_vectors_program_kvm_gsi_routes(kvm):
    from pykvm.interrupts import gsi_routing
    from pykvm.vstate.vm import Vm

    with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        function = VirtioPciDevice(vm, memory, RngDevice())
        PciBus(vm).add(function)
        routing = gsi_routing(vm)
        config, msix = function.config, function.msix
        config.write(msix.offset + 2, 2, CONTROL_ENABLE)
        msix.write(0, 4, 0xFEE00000)
        msix.write(8, 4, 0x4041)
        msix.write(12, 4, 0)                     # unmask: the route goes to KVM
        entries = {e.gsi: e for e in routing.entries()}
        gsi = msix._lines[0].gsi
        assert gsi >= layout.MSI_GSI_BASE
        assert entries[gsi].u.msi.address_lo == 0xFEE00000 and entries[gsi].u.msi.data == 0x4041
        assert 2 not in {e.gsi for e in entries.values() if e.u.irqchip.irqchip == 0 and e.type == 1}
        assert routing.commits >= 1
        assert msix.notify(0)                    # through the irqfd: no error, no exit


# --- the console and rng devices behind the transport (worker thread, MSI-X) -------------------


def start(function, memory, queues):
    from pykvm.devices.virtio.driver import DriverRing

    driver = PciDriver(function)
    driver.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX)
    rings = [DriverRing(memory, 0x1000 + 0x2000 * index, 16) for index in range(queues)]
    for index, ring in enumerate(rings):
        driver.setup_queue(index, ring)
    driver.driver_ok()
    return driver, rings


def test_rng_fills_the_guest_buffer(rng_function, stand_in):
    function, _ = rng_function
    memory = stand_in.memory
    driver, (ring,) = start(function, memory, 1)
    memory.fill(0x20000, 64, 0)
    ring.add_chain([(0x20000, 64, True)])
    driver.notify(0)
    assert wait_for(lambda: ring.used_idx() == 1)
    assert ring.take_used()[0][1] == 64 and memory.read(0x20000, 64) != bytes(64)


def test_console_transmits_and_receives(stand_in):
    import io
    from pykvm.devices.virtio.console import ConsoleDevice

    memory = stand_in.memory
    output = io.BytesIO()
    console = ConsoleDevice(output)
    function = VirtioPciDevice(stand_in, memory, console,
                               interrupt_lines=[RecordingLine(24 + i) for i in range(3)])
    try:
        console.receive(b"typed early ")         # before the driver is ready: kept
        driver, (rx, tx) = start(function, memory, 2)
        rx.add_chain([(0x20000, 8, True)])
        driver.notify(0)
        assert wait_for(lambda: rx.used_idx() == 1)
        assert memory.read(0x20000, 8) == b"typed ea"
        console.receive(b"more")                 # no buffer: waits, nothing lost
        rx.add_chain([(0x20100, 64, True)])
        driver.notify(0)
        assert wait_for(lambda: rx.used_idx() == 2)
        assert rx.take_used()[1] == (1, 8) and memory.read(0x20100, 8) == b"rly more"
        memory.write(0x30000, b"hello from hvc0\n")
        tx.add_chain([(0x30000, 16, False)])
        driver.notify(1)
        assert wait_for(lambda: tx.used_idx() == 1)
        assert output.getvalue() == b"hello from hvc0\n"
    finally:
        function.close()


def test_a_route_kvm_refuses_is_counted_not_raised(kvm, monkeypatch):
    from pykvm.errors import KvmError
    from pykvm.interrupts import GsiRouting, gsi_routing
    from pykvm.vstate.vm import Vm

    with GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        function = VirtioPciDevice(vm, memory, RngDevice())
        PciBus(vm).add(function)
        msix = function.msix
        function.config.write(msix.offset + 2, 2, CONTROL_ENABLE)
        msix.write(0, 4, 0xFEE00000)
        monkeypatch.setattr(GsiRouting, "_commit", lambda self: (_ for _ in ()).throw(
            KvmError("KVM_SET_GSI_ROUTING", 22)))
        msix.write(12, 4, 0)                     # unmask: KVM says EINVAL
        assert msix.refused_routes == 1
        assert msix._lines[0].gsi not in {e.gsi for e in gsi_routing(vm).entries()}
        monkeypatch.undo()
