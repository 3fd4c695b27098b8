"""Live shares (issue #16 item 3): virtio-fs through a virtiofsd pykvm starts,
supervises and stops, in the default Linux guest. One boot for the whole file.

- a file the guest writes under /mnt/share is on the host while the VM runs, and
  a file the host writes is seen by the guest;
- ``ro``: the guest cannot write, the host's files are there;
- a back end killed under a running guest: that device goes NEEDS_RESET with one
  line on stderr, the VM and the other share keep working;
- on close no virtiofsd, socket directory or memfd is left.
"""

import io
import os
import threading
import time

import pytest

from pykvm.devices.virtio.device import STATUS_NEEDS_RESET
from pykvm.devices.virtio.fs import FsSpec
from pykvm.machine import MachineConfig, build_for_boot, default_linux_guest
from pykvm.vhost_user.daemon import virtiofsd_path

from ..logs import pykvm_warnings

pytestmark = [pytest.mark.linux,
              pytest.mark.skipif(virtiofsd_path() is None,
                                 reason="virtiofsd missing (apt-get install qemu-system-common)")]

BOOT_TIMEOUT = 900
TIMEOUT = 300


def test_live_shares_both_ways_read_only_and_a_dying_back_end(kvm, tmp_path, caplog):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "host.txt").write_bytes(b"read-only from the host\n")
    kernel, initrd = default_linux_guest()
    config = MachineConfig(kernel=kernel, initrd=initrd, mem_size=256 << 20, agent=True,
                           live_shares=[FsSpec("pykvm-share", source=str(rw)),
                                        FsSpec("other", source=str(ro), read_only=True)])
    console = io.BytesIO()
    machine = build_for_boot(config, stdout=console, stderr=console)
    daemons = [device.daemon for device in machine.virtio.shares]
    directories = [daemon.directory for daemon in daemons]
    pids = [daemon.process.pid for daemon in daemons]
    memfd = f"/proc/self/fd/{machine.memory.fd}"
    runner = threading.Thread(target=machine.run, daemon=True)
    runner.start()
    try:
        machine.wait_for_agent(BOOT_TIMEOUT)
        mounts = machine.get_file("/proc/mounts")
        assert b"pykvm-share /mnt/share virtiofs rw" in mounts, mounts
        assert b"other /mnt/share1 virtiofs ro" in mounts, mounts

        # the guest writes, the host sees it while the VM runs
        machine.exec("echo written in the guest > /mnt/share/from-guest", timeout=TIMEOUT,
                     check=True)
        assert (rw / "from-guest").read_bytes() == b"written in the guest\n"
        # the host writes, the guest sees it
        (rw / "from-host").write_bytes(b"written on the host\n")
        seen = machine.exec("cat /mnt/share/from-host", timeout=TIMEOUT, check=True)
        assert seen.stdout == b"written on the host\n"

        # read-only: the host's file is there, a write is refused
        assert machine.get_file("/mnt/share1/host.txt") == b"read-only from the host\n"
        denied = machine.exec("touch /mnt/share1/new", timeout=TIMEOUT)
        assert denied.status != 0 and b"Read-only file system" in denied.stderr
        assert not (ro / "new").exists()

        # the second back end dies: its device needs a reset, nothing else notices
        transport = machine.virtio.functions[
            [f.device for f in machine.virtio.functions].index(machine.virtio.shares[1])]
        caplog.clear()
        os.kill(pids[1], 9)
        deadline = time.monotonic() + 30
        while not transport.status & STATUS_NEEDS_RESET and time.monotonic() < deadline:
            time.sleep(0.05)
        assert transport.status & STATUS_NEEDS_RESET
        assert runner.is_alive()
        again = machine.exec("cat /mnt/share/from-guest", timeout=TIMEOUT, check=True)
        assert again.stdout == b"written in the guest\n"
        lines = pykvm_warnings(caplog, "pykvm.devices")
        assert len(lines) == 1 and lines[0].startswith("virtio-fs1: ") and \
            "killed by signal 9" in lines[0] and "needs reset" in lines[0], lines
    finally:
        machine.request_stop("user", 0, "test done")
        runner.join(60)
        machine.close()
    # everything pykvm started is gone
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(directory.exists() for directory in directories)
    assert not os.path.exists(memfd) or "pykvm-guest-ram" not in os.readlink(memfd)


def test_rootfs_runs_the_hosts_own_python_in_the_working_directory(tmp_path):
    """``pykvm run --rootfs / -- CMD`` (issue #16 item 4): the host's root, read-only under
    a tmpfs overlay, the working directory shared read-write at its own path."""
    import subprocess
    import sys

    marker = f"/etc/pykvm-overlay-{os.getpid()}"
    command = (f"python3 -c 'print(6*7)'; pwd; echo made > made-in-guest; "
               f"touch {marker} && echo overlay-ok")
    done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--rootfs", "/", "--", command],
                          cwd=tmp_path, capture_output=True, timeout=BOOT_TIMEOUT)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.decode().split() == ["42", str(tmp_path), "overlay-ok"]
    assert (tmp_path / "made-in-guest").read_bytes() == b"made\n"
    assert not os.path.exists(marker)       # the guest's writes outside the share stay in it
