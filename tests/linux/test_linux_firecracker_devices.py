"""The default guest under ``pykvm firecracker`` uses the devices of /balloon, /entropy
and SendCtrlAltDel: its virtio-balloon driver inflates when PATCH /balloon asks (its
MemTotal drops, the host's resident guest RAM too) and reports statistics, its hwrng is
the virtio-rng, Linux's atkbd finds the i8042's keyboard, its reboot ends the VMM with
status 0 (Firecracker's contract), and Ctrl-Alt-Del pressed through the API is such a
reboot.
Linux boots (minutes on kvm_pvm hosts)."""

from __future__ import annotations

import re
import time

import pytest

from ..guest_shell import COMMAND_TIMEOUT
from .test_linux_firecracker import FirecrackerShell, reboots_on_ctrl_alt_del

pytestmark = pytest.mark.linux

MEM_MIB = 256
BALLOON_MIB = 64


def guest():
    from pykvm.machine import default_guest_dir, default_linux_guest
    directory = default_guest_dir()
    if directory is None:
        pytest.skip("the default Linux guest is not built (pykvm guest build)")
    kernel, initrd = default_linux_guest()
    return directory, kernel, initrd


def boot(shell, kernel, initrd, **resources):
    shell.wait_for_socket()
    shell.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB})
    source = {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0 reboot=k pci=off"}
    if initrd:
        source["initrd_path"] = str(initrd)
    shell.ok("PUT", "/boot-source", source)
    for url, body in resources.items():
        shell.ok("PUT", f"/{url}", body)
    shell.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    shell.wait_for_shell()


def meminfo(shell, field: str) -> int:
    """A /proc/meminfo field of the guest, in KiB."""
    text = shell.check(f"grep '^{field}:' /proc/meminfo")
    return int(re.search(r"(\d+) kB", text).group(1))


def host_guest_ram_kib(pid: int) -> int:
    """Resident shared memory of the VMM process: its guest RAM (a memfd)."""
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"RssShmem:\s+(\d+) kB", status.read()).group(1))


def wait_for_stats(shell, ready, timeout=600.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = shell.ok("GET", "/balloon/statistics")
        if ready(stats):
            return stats
        assert time.monotonic() < deadline, f"balloon statistics never became ready: {stats}"
        time.sleep(1)


def test_balloon_entropy_and_keyboard_in_linux(tmp_path):
    directory, kernel, initrd = guest()
    with FirecrackerShell(tmp_path / "fc.sock", tmp_path / "fc.log") as shell:
        boot(shell, kernel, initrd,
             balloon={"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1},
             entropy={})
        # virtio-rng is the guest's hardware RNG, and it gives bytes.
        assert "virtio_rng" in shell.check("cat /sys/class/misc/hw_random/rng_current")
        assert shell.check("head -c 64 /dev/hwrng | wc -c").strip() == "64"
        # atkbd found the keyboard behind the i8042 (and translated set 2 it is).
        assert "AT Translated Set 2 keyboard" in shell.check("dmesg")
        # The balloon: statistics arrive, then an inflate takes RAM from the guest.
        stats = wait_for_stats(shell, lambda s: "total_memory" in s)
        assert stats["target_mib"] == 0 and stats["total_memory"] > (MEM_MIB - 64) << 20
        total = meminfo(shell, "MemTotal")
        resident = host_guest_ram_kib(shell.process.pid)
        shell.ok("PATCH", "/balloon", {"amount_mib": BALLOON_MIB})
        assert shell.ok("GET", "/balloon")["amount_mib"] == BALLOON_MIB
        stats = wait_for_stats(shell, lambda s: s["actual_mib"] == BALLOON_MIB)
        assert stats["target_pages"] == BALLOON_MIB << 8
        inflated = meminfo(shell, "MemTotal")
        assert total - inflated >= (BALLOON_MIB - 1) << 10, (total, inflated)
        after = host_guest_ram_kib(shell.process.pid)
        print(f"host RssShmem {resident} KiB -> {after} KiB with {BALLOON_MIB} MiB inflated")
        # Deflate: the guest has its memory back.
        shell.ok("PATCH", "/balloon", {"amount_mib": 0})
        wait_for_stats(shell, lambda s: s["actual_mib"] == 0)
        assert meminfo(shell, "MemTotal") == total
        # The guest's reboot (reboot=k: the i8042's reset line) ends the VMM with 0.
        shell.type("reboot -f\n")
        assert shell.process.wait(timeout=COMMAND_TIMEOUT) == 0
        assert "guest requested a reset" in (tmp_path / "fc.log").read_text(errors="replace")


def test_ctrl_alt_del_reboots_the_guest_and_ends_the_vmm(tmp_path):
    directory, kernel, initrd = guest()
    if not reboots_on_ctrl_alt_del(directory):
        pytest.skip("the default guest kernel has no CONFIG_VT: Linux turns Ctrl-Alt-Del "
                    "into a reboot in the VT keyboard driver (drivers/tty/vt/keyboard.c)")
    with FirecrackerShell(tmp_path / "fc.sock", tmp_path / "fc.log") as shell:
        boot(shell, kernel, initrd)
        assert "AT Translated Set 2 keyboard" in shell.check("dmesg")
        shell.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        assert shell.process.wait(timeout=300) == 0
        log = (tmp_path / "fc.log").read_text(errors="replace")
        assert "guest requested a reset" in log, log[-2000:]
