"""vhost-user-blk in the default Linux guest (issue #16 item 5): a qcow2 image made
with ``qemu-img create -f qcow2`` is served by the qemu-storage-daemon pykvm starts;
the guest formats it (busybox mke2fs), writes a file on it and unmounts it, and the
host finds the file in the image once the VM is closed. A second disk, raw and
read-only through the daemon, is read-only in the guest too. One boot for the file.
"""

import io
import os
import shutil
import subprocess
import threading

import pytest

from pykvm.machine import MachineConfig, build_for_boot, default_linux_guest
from pykvm.machine.config import DiskSpec
from pykvm.vhost_user.daemon import storage_daemon_path

pytestmark = [pytest.mark.linux,
              pytest.mark.skipif(storage_daemon_path() is None or not shutil.which("qemu-img")
                                 or not shutil.which("debugfs", path="/sbin:/usr/sbin:/usr/bin"),
                                 reason="needs qemu-storage-daemon, qemu-img and debugfs "
                                        "(apt-get install qemu-system-common qemu-utils "
                                        "e2fsprogs)")]

BOOT_TIMEOUT = 900
TIMEOUT = 300


def test_a_qcow2_disk_formatted_and_written_by_the_guest(kvm, tmp_path):
    image = tmp_path / "disk"                 # no .qcow2: pykvm finds the format by content
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    raw = tmp_path / "ro.img"
    raw.write_bytes(b"pykvm read-only disk\n".ljust(1 << 20, b"\0"))
    kernel, initrd = default_linux_guest()
    config = MachineConfig(kernel=kernel, initrd=initrd, mem_size=256 << 20, agent=True,
                           disks=[DiskSpec.parse(str(image)),
                                  DiskSpec.parse(f"{raw},backend=vhost-user,ro")])
    console = io.BytesIO()
    machine = build_for_boot(config, stdout=console, stderr=console)
    daemons = [device.daemon for device in machine.virtio.disks]
    assert all(daemon is not None and daemon.alive for daemon in daemons)
    pids = [daemon.process.pid for daemon in daemons]
    runner = threading.Thread(target=machine.run, daemon=True)
    runner.start()
    try:
        machine.wait_for_agent(BOOT_TIMEOUT)
        sizes = machine.exec("cat /sys/block/vda/size /sys/block/vdb/ro", timeout=TIMEOUT,
                             check=True)
        assert sizes.stdout.split() == [b"131072", b"1"], sizes
        done = machine.exec(
            "mke2fs -q /dev/vda >/dev/null && mkdir -p /mnt/vda && mount /dev/vda /mnt/vda && "
            "echo written by the guest > /mnt/vda/hello.txt && umount /mnt/vda && "
            "head -c 21 /dev/vdb && "
            "{ dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null "
            "&& echo WROTE || echo REFUSED; }", timeout=TIMEOUT)
        assert done.status == 0, (done, console.getvalue()[-2000:])
        assert done.stdout == b"pykvm read-only disk\nREFUSED\n", done
    finally:
        machine.request_stop("user", 0, "test done")
        runner.join(60)
        machine.close()
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")], "a daemon outlived the VM"
    assert raw.read_bytes().startswith(b"pykvm read-only disk\n")
    subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)
    flat = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(flat)],
                   check=True)
    debugfs = shutil.which("debugfs", path="/sbin:/usr/sbin:/usr/bin")
    found = subprocess.run([debugfs, "-R", "cat /hello.txt", str(flat)], capture_output=True)
    assert found.stdout == b"written by the guest\n", found
