"""Snapshots of the default Linux guest, through the pytest plugin's guests
(``linux_vms``, pykvm/pytest_plugin): its machine with a 16 MiB scratch disk is booted
once per session (and kept between sessions), snapshotted at its ready point, and each
guest here is restored from that snapshot onto the test's own zeroed image (the plugin
keys a disk by its bytes, not its path).

- guests restored from one snapshot are independent, in tmpfs and on their disks;
- the snapshot's memory file holds only the pages the guest used;
- a snapshot taken while the guest writes its disk restores to intact data.
"""

import hashlib
import time
from pathlib import Path

import pytest

from pykvm.snapshot import save_snapshot

pytestmark = pytest.mark.linux

LINUX_COMMAND_TIMEOUT = 300       # a fork+exec is 1.5 s on kvm_pvm, more when busy
SCRATCH_MIB = 16


def scratch_disk(directory: Path):
    from pykvm.machine import DiskSpec

    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "scratch.img"
    with open(image, "wb") as file:
        file.truncate(SCRATCH_MIB << 20)
    return DiskSpec(str(image), serial="scratch")


def shell(guest, command: str, timeout: float = LINUX_COMMAND_TIMEOUT) -> str:
    """``command``'s output (stripped); its exit status must be 0."""
    return guest.exec(command, timeout=timeout, check=True).stdout.decode().strip()


def test_restored_guests_are_independent(linux_vms, tmp_path):
    """Three guests from one snapshot, each onto its own disk image: each runs a command
    and leaves a file in /tmp (tmpfs) that the next one does not see, and what each
    writes to its disk is in its own image only."""
    guests, seen = [], []
    for round_ in range(3):
        guest = linux_vms(disks=(scratch_disk(tmp_path / f"r{round_}"),))
        guests.append(guest)
        assert shell(guest, "echo $((6 * 7))") == "42"
        seen.append(shell(guest, "ls /tmp").split())
        shell(guest, f"echo round-{round_} > /tmp/written-{round_}")
        assert shell(guest, f"cat /tmp/written-{round_}") == f"round-{round_}"
        shell(guest, f"dd if=/tmp/written-{round_} of=/dev/vda conv=fsync 2>/dev/null")
    assert len({guest.snapshot for guest in guests}) == 1 and guests[0].snapshot is not None
    for listing in seen:
        assert not any(name.startswith("written-") for name in listing), listing
    for round_ in range(3):
        image = (tmp_path / f"r{round_}" / "scratch.img").read_bytes()
        assert image[:8] == f"round-{round_}\n".encode()
        assert not image[8:].strip(b"\0")


def test_the_restored_guest_comes_from_a_sparse_snapshot(linux_vms, tmp_path):
    """The guest is restored, not booted, and its snapshot's memory file holds only the
    pages the guest used: less on disk than the guest's RAM."""
    guest = linux_vms(disks=(scratch_disk(tmp_path),))
    assert shell(guest, "uname -s") == "Linux"
    assert guest.snapshot is not None, guest.origin
    memory = guest.snapshot / "memory.bin"
    assert memory.stat().st_blocks * 512 < guest.machine.config.mem_size


def test_snapshot_mid_disk_io_restores_intact_data(linux_vms, pykvm_device, tmp_path):
    """A guest writes 1 MiB to its disk in the background, 64 KiB per dd with an fsync
    each; it is snapshotted with some written and some not, stopped, and restored: the
    restored guest finishes the writes and reads back exactly what it wrote, and the
    host sees the same bytes in the image. (Small: on kvm_pvm the guest kernel copies
    about 64 KiB a second, its ring 0 being emulated.)"""
    from pykvm.pytest_plugin import LinuxVm
    from pykvm.warm.guest import ConsoleLog, restore_guest

    size, chunks = 1 << 20, 16
    disk = scratch_disk(tmp_path)
    guest = linux_vms(disks=(disk,))
    # Varied bytes with few system calls: the start of busybox's own binary.
    shell(guest, f"head -c {size} /bin/busybox > /tmp/data", timeout=600)
    steps = " ".join(str(i) for i in range(chunks))
    shell(guest, f"(for i in {steps}; do dd if=/tmp/data of=/dev/vda bs={size // chunks} "
                 f"count=1 skip=$i seek=$i conv=fsync 2>/dev/null; done; "
                 f"echo done > /tmp/dd-finished) </dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + 300
    while True:                                # until the first chunk reached the disk
        written = int(shell(guest, "cat /sys/block/vda/stat").split()[6]) * 512
        if written:
            break
        assert time.monotonic() < deadline, "the guest wrote nothing to its disk"
    assert written < size, "all written before the snapshot: not mid-I/O"
    guest.machine.vm.pause()                   # it never runs after the snapshot: the
    save_snapshot(guest.machine, tmp_path / "mid-io")   # image stays as the snapshot knows it
    guest.close()
    restored = restore_guest(tmp_path / "mid-io", pykvm_device, ConsoleLog(), factory=LinuxVm,
                             disks=(disk,))
    try:
        deadline = time.monotonic() + 900
        while restored.exec("cat /tmp/dd-finished", timeout=LINUX_COMMAND_TIMEOUT).status:
            assert time.monotonic() < deadline, "the writes did not finish after the restore"
            time.sleep(2)
        local = shell(restored, "md5sum < /tmp/data").split()[0]
        on_disk = shell(restored, f"head -c {size} /dev/vda | md5sum").split()[0]
        assert local == on_disk
    finally:
        restored.close()
    image = Path(disk.path).read_bytes()[:size]
    assert hashlib.md5(image).hexdigest() == local
