"""virtio-pci over INTx with the real default Linux guest: ONE boot with ``pci=nomsi``
(as a guest whose drivers lack MSI-X sees it) and two disks plus the RNG, one device on
each of pykvm's INTx GSIs. Linux finds the routes in the DSDT's _PRT (pykvm/boot/acpi.py);
without it every device said "PCI INT A: no GSI" and got no interrupt at all."""

import pytest

from pykvm import layout

from .test_linux_virtio import GUEST, boot_with_disks
from ..conftest import needs_kvm

RO_PATTERN = b"INTX-READ-ONLY!!" * 32   # one sector

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
]

# Every line the host reads starts with a key=; each read below waits for an interrupt.
SCRIPT = (
    "dd if=/dev/vda bs=4k count=100 of=/dev/null 2>/dev/null && echo vda=ok; "
    "echo vdb=$(head -c 16 /dev/vdb); "
    "echo rng=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); "
    "for d in /sys/bus/pci/devices/*; do echo irq_${d##*/}=$(cat $d/irq); done; "
    "echo virtio_irqs=\"$(grep virtio /proc/interrupts | tr -s ' ' | tr '\\n' ';')\"; "
    "echo msi=$(grep -c -i msi /proc/interrupts); "
    "echo noroute=$(dmesg | grep -c -i -E 'no GSI|derive routing'); "
    "echo root=$(dmesg | grep -c 'PCI Root Bridge \\[PCI0\\]'); "
    "echo cmdline=$(cat /proc/cmdline)"
)


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    return boot_with_disks(tmp_path_factory.mktemp("intx"), RO_PATTERN, SCRIPT,
                           ["--append", "pci=nomsi"])


def test_devices_work_through_intx_alone(boot):
    assert boot.returncode == 0, boot.stderr[-3000:]
    assert "pci=nomsi" in boot.values.get("cmdline", ""), boot.stdout
    assert boot.values.get("vda") == "ok", boot.stdout
    assert boot.values.get("vdb") == RO_PATTERN[:16].decode(), boot.stdout
    rng = boot.values.get("rng", "")
    assert len(rng) == 64 and rng != "0" * 64, boot.stdout
    assert boot.values.get("msi") == "0", boot.stdout


def test_linux_routes_intx_through_the_acpi_root_bridge(boot):
    assert boot.values.get("root") == "1", boot.stdout        # ACPI: PCI Root Bridge [PCI0]
    assert boot.values.get("noroute") == "0", boot.stdout     # no "PCI INT A: no GSI"
    assert "pci=" not in boot.values["cmdline"].replace("pci=nomsi", ""), boot.values["cmdline"]


def test_each_function_has_the_gsi_of_its_slot(boot):
    """The IRQ Linux gives each function is the GSI pykvm's bus raises for its slot."""
    irqs = {key[len("irq_"):]: int(value) for key, value in boot.values.items()
            if key.startswith("irq_")}
    functions = {address: irq for address, irq in irqs.items() if not address.endswith("00.0")}
    assert len(functions) == 3, irqs                          # vda, vdb, rng
    for address, irq in functions.items():
        slot = int(address.split(":")[2].split(".")[0], 16)
        assert irq == layout.PCI_INTX_GSI_BY_SLOT[slot], (address, irq)
    assert set(functions.values()) == set(layout.PCI_INTX_GSIS)   # all three GSIs in use


def test_interrupts_arrive_on_level_triggered_ioapic_pins(boot):
    lines = [line.strip() for line in boot.values.get("virtio_irqs", "").split(";") if line.strip()]
    assert len(lines) == 3, boot.stdout
    for line in lines:
        fields = line.split()
        counts = [int(f) for f in fields[1:] if f.isdigit()]
        assert sum(counts) > 0, line
        assert "IO-APIC" in fields and any(f.endswith("-fasteoi") for f in fields), line
