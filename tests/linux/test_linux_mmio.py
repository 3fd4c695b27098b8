"""virtio-mmio with the real default Linux guest: ONE boot (`pykvm run --transport
mmio`, ``pci=off`` on the command line as firectl and Kata give it) with a writable
disk, a read-only disk, the virtio console (the command's output comes back through
it) and the RNG -- four devices on four IRQs -- found by Linux only through the
``virtio_mmio.device=`` entries pykvm announces; the host then checks the image."""

import shutil
import subprocess

import pytest

from pykvm import layout

from .test_linux_virtio import GUEST, boot_with_disks
from ..conftest import needs_kvm

CONTENT = "written-by-the-guest-through-virtio-mmio"
RO_PATTERN = b"MMIO-READ-ONLY!!" * 32   # one sector

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
]

# Every line the host reads starts with a key=; one fork+exec costs ~1.5 s on kvm_pvm.
SCRIPT = (
    "mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && "
    f"echo {CONTENT} > /mnt/hello.txt && sync && umount /mnt && echo fs=ok; "
    "echo back=$(mount -t ext4 -o ro /dev/vda /mnt && cat /mnt/hello.txt); "
    "echo rng=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); "
    "echo rodata=$(head -c 16 /dev/vdb); "
    "echo ro=$(cat /sys/block/vdb/ro); "
    "echo mmio=$(ls /sys/bus/platform/devices | grep -c virtio-mmio); "
    "echo pci=$(ls /sys/bus/pci/devices 2>/dev/null | wc -l); "
    "echo irqs=$(grep -c virtio /proc/interrupts); "
    "echo console=$(cat /sys/class/tty/console/active); "
    "echo cmdline=$(cat /proc/cmdline)"
)


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    return boot_with_disks(tmp_path_factory.mktemp("mmio"), RO_PATTERN, SCRIPT,
                           ["--transport", "mmio", "--append", "pci=off",
                            "--console", "virtio"])


def test_the_guest_finds_its_devices_on_the_command_line_alone(boot):
    assert boot.returncode == 0, boot.stderr[-3000:]
    assert boot.values.get("pci") == "0", boot.stdout            # no PCI bus at all
    assert boot.values.get("mmio") == "4", boot.stdout           # disks, console, RNG
    for slot, irq in enumerate(layout.VIRTIO_MMIO_IRQS[:4]):
        assert f"virtio_mmio.device=4K@{0xd0000000 + 0x1000 * slot:#x}:{irq}" \
            in boot.values["cmdline"]
    assert int(boot.values.get("irqs", "0")) == 4, boot.stdout   # each device's line
    assert boot.values.get("console") == "hvc0", boot.stdout     # output came over it


def test_the_guest_writes_a_file_system_and_reads_it_back(boot):
    assert boot.values.get("fs") == "ok", boot.stdout
    assert boot.values.get("back") == CONTENT, boot.stdout
    if shutil.which("debugfs") is None:
        pytest.skip("debugfs (e2fsprogs) is not installed")
    shown = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(boot.blank)],
                           capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == CONTENT


def test_read_only_disk_and_rng_over_mmio(boot):
    assert boot.values.get("ro") == "1", boot.stdout
    assert boot.values.get("rodata") == RO_PATTERN[:16].decode(), boot.stdout
    rng = boot.values.get("rng", "")
    assert len(rng) == 64 and rng != "0" * 64, boot.stdout
