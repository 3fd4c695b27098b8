"""virtio over PCI with the real default Linux guest: ONE boot (minutes on
kvm_pvm hosts) with a blank writable disk, a read-only disk, the RNG and the
virtio console; the host then checks the disks' images itself."""

import shutil
import subprocess
import sys
import time

import pytest

from pykvm.machine import default_guest_dir

from ..conftest import needs_kvm

GUEST = default_guest_dir()
BOOT_TIMEOUT = 900
CONTENT = "written-by-the-guest-through-virtio-blk"
RO_PATTERN = b"READ-ONLY-IMAGE!" * 32   # one sector

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
]

# Every line the host reads starts with a key=; one fork+exec costs ~1.5 s on kvm_pvm.
SCRIPT = (
    f"mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && "
    f"echo {CONTENT} > /mnt/hello.txt && sync && umount /mnt && echo fs=ok; "
    "echo rng=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'); "
    "echo pci=$(cat /sys/bus/pci/devices/*/device | tr '\\n' ' '); "
    "echo serial=$(cat /sys/block/vda/serial); "
    "echo ro=$(cat /sys/block/vdb/ro); "
    "if echo overwrite | dd of=/dev/vdb conv=fsync 2>/dev/null; "
    "then echo rowrite=succeeded; else echo rowrite=failed; fi; "
    "echo rodata=$(head -c 16 /dev/vdb); "
    "echo console=$(cat /sys/class/tty/console/active)"
)


@pytest.fixture(scope="module")
def boot(tmp_path_factory):
    return boot_with_disks(tmp_path_factory.mktemp("virtio"), RO_PATTERN, SCRIPT,
                           ["--console", "virtio"], serial="pykvm-disk-0")


def boot_with_disks(where, ro_pattern: bytes, script: str, options: list[str], serial=""):
    """One `pykvm run` of the default guest with a blank 16 MiB disk (vda), a read-only
    one filled with ``ro_pattern`` (vdb) and the RNG, running ``script``; the result
    with ``values`` (the key=value lines it printed), ``elapsed``, ``blank``."""
    blank, read_only = where / "blank.img", where / "ro.img"
    with open(blank, "wb") as image:
        image.truncate(16 << 20)
    read_only.write_bytes(ro_pattern * 256)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pykvm", "run", "--mem", "256M", *options,
         "--disk", f"{blank},serial={serial}" if serial else str(blank),
         "--disk", f"{read_only},ro", "--rng", "--", script],
        capture_output=True, text=True, timeout=BOOT_TIMEOUT)
    result.elapsed = time.monotonic() - started
    result.values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    result.blank, result.read_only = blank, read_only
    return result


def test_the_command_ran_on_the_virtio_console(boot):
    assert boot.returncode == 0, boot.stderr[-3000:]
    assert boot.values.get("console") == "hvc0", boot.stdout


def test_guest_sees_the_virtio_functions_on_pci(boot):
    devices = boot.values["pci"].split()
    assert devices.count("0x1042") == 2 and "0x1044" in devices and "0x1043" in devices, devices
    assert "0x0008" in devices   # the host bridge


def test_guest_file_system_lands_in_the_image(boot):
    assert boot.values.get("fs") == "ok", boot.stdout
    if shutil.which("debugfs") is None:
        pytest.skip("debugfs (e2fsprogs) is not installed")
    shown = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(boot.blank)],
                           capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == CONTENT


def test_disk_serial_reaches_the_guest(boot):
    assert boot.values.get("serial") == "pykvm-disk-0"


def test_hwrng_gives_random_bytes(boot):
    data = bytes.fromhex(boot.values["rng"])
    assert len(data) == 32 and len(set(data)) > 8


def test_read_only_disk_reads_but_refuses_writes(boot):
    assert boot.values.get("ro") == "1"
    assert boot.values.get("rowrite") == "failed"
    assert boot.values.get("rodata") == RO_PATTERN[:16].decode()
    assert boot.read_only.read_bytes() == RO_PATTERN * 256
