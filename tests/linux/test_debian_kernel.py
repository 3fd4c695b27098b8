"""Debian's own kernels booted by pykvm (issue #15 item 2), as a user would:

    pykvm run --kernel /boot/vmlinuz-6.1.0-57-cloud-amd64 --cpus 2 -- 'cat /sys/devices/system/cpu/online'

The kernel is Debian's package, fetched with ``apt-get download`` into pykvm's cache and
unpacked with ``dpkg-deb -x`` (pykvm/distro/kernel.py); the initramfs is pykvm's own, taken
because ``-- CMD`` was given without ``--initrd`` (its /init runs the command and reports
its exit status). On kvm_pvm pykvm adds the Debian command line and slows the guest's clock
(pykvm/quirks/cmdline.py); the cloud kernel with 2 vCPUs then reaches its command in about
4.5 minutes on a quiet host (bench/RESULTS.md, "debian boot"), so one boot answers every
question this file asks, and the generic flavour, which needs as long again, is ``slow``
(PYKVM_SLOW_TESTS=1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..guest_shell import REPO

pytestmark = [pytest.mark.linux]

BOOT_TIMEOUT = 3600        # seconds: a Debian kernel's boot where ring 0 is emulated
EXIT_STATUS = 7            # the command's own status, which pykvm must exit with
# One command, one boot: the CPUs Linux brought up, the kernel, the clock it believes in.
QUESTIONS = ("cat /sys/devices/system/cpu/online; uname -r; grep -c ^processor /proc/cpuinfo; "
             "cat /proc/cmdline; exit 7")


def debian_kernel(flavour: str):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch Debian's kernel")
    from pykvm.distro.kernel import fetch
    return fetch(flavour)


def run_in_guest(kernel, cpus: int, command: str, log: Path) -> tuple[int, str, float]:
    """``pykvm run --kernel KERNEL --cpus N --cold -v -- COMMAND``, with no --initrd:
    (status, output, seconds); the console goes to ``log``."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    with open(log, "wb") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "pykvm", "run", "--kernel", str(kernel.vmlinuz),
             "--cpus", str(cpus), "--cold", "-v", "--", command],
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
            cwd=str(REPO), timeout=BOOT_TIMEOUT)
    return done.returncode, done.stdout.decode(errors="replace"), time.monotonic() - started


def host_tsc_mhz() -> float:
    """The TSC frequency KVM gives a vCPU here (KVM_GET_TSC_KHZ), in MHz."""
    from pykvm.kvm import Kvm
    from pykvm.memory import GuestMemory
    from pykvm.vstate.vm import Vm

    with Kvm() as kvm, GuestMemory.anonymous(2 << 20) as memory, Vm(kvm, memory) as vm:
        return vm.create_vcpus(1)[0].tsc_khz() / 1000


def check_boot(flavour: str, cpus: int, tmp_path):
    from pykvm.kvm import detect_host_kind
    from pykvm.quirks.cmdline import DEBIAN_CLOCK_SLOWDOWN

    kernel = debian_kernel(flavour)
    log = tmp_path / "boot.log"
    status, output, seconds = run_in_guest(kernel, cpus, QUESTIONS, log)
    console = log.read_text(errors="replace")
    assert status == EXIT_STATUS, f"status {status} after {seconds:.0f} s:\n{console[-3000:]}"
    online, release, processors, cmdline = output.splitlines()
    assert (online, release, processors) == (f"0-{cpus - 1}", kernel.release, str(cpus))
    assert f"smpboot: Total of {cpus} processors activated" in console, console[-3000:]
    # Linux believes its TSC runs DEBIAN_CLOCK_SLOWDOWN times faster than KVM's where ring
    # 0 is emulated (fewer ticks per real second), at KVM's own rate elsewhere.
    on_pvm = detect_host_kind() == "kvm_pvm"
    slowdown = DEBIAN_CLOCK_SLOWDOWN if on_pvm else 1
    detected = re.search(r"tsc: Detected ([0-9.]+) MHz processor", console)
    assert detected, console[:3000]
    assert abs(float(detected.group(1)) / (host_tsc_mhz() * slowdown) - 1) < 0.01, \
        (detected.group(0), slowdown)
    # pykvm's Debian command line reached the kernel, and the user's initramfs was pykvm's.
    assert ("initcall_blacklist=ftrace_check_for_weak_functions" in cmdline) == on_pvm
    assert "Run /init as init process" in console


def test_debian_cloud_kernel_brings_up_two_cpus(tmp_path):
    """The cloud flavour describes its CPUs by ACPI's MADT only (no MP table parser)."""
    check_boot("cloud", 2, tmp_path)


@pytest.mark.slow
def test_debian_cloud_kernel_brings_up_four_cpus(tmp_path):
    """More vCPUs than this project's hosts have CPUs: the boot still completes."""
    check_boot("cloud", 4, tmp_path)


@pytest.mark.slow
def test_debian_generic_kernel_brings_up_two_cpus(tmp_path):
    check_boot("generic", 2, tmp_path)


@pytest.mark.slow
def test_debian_image_boots_its_own_kernel_initramfs_and_systemd(tmp_path):
    """Issue #15 items 2 and 5: `pykvm image debian --kernel --packages systemd-sysv`, then
    `pykvm run --image root.img,ro --image-kernel --cpus 2`: initramfs-tools loads the
    virtio modules and mounts /dev/vda, systemd starts, and answers `systemctl
    is-system-running` (asked through systemd.run=; its success action powers off, which
    ends pykvm with 0). bench/debian_systemd.py times the same boot."""
    from pykvm.distro import debian
    from pykvm.distro.boot import SYSTEM_STATE_QUESTION, system_state_answer, systemd_run_words

    if shutil.which("mmdebstrap") is None or os.geteuid() != 0:
        pytest.skip("needs mmdebstrap and root (pykvm image debian)")
    image = debian.DebianImage(packages=("systemd-sysv",), kernel=True,
                               mirror=debian.host_mirror())
    built = debian.build(image, say=lambda line: print(line, file=sys.stderr))
    root = tmp_path / "root.img"
    debian.export(built, root)
    done = subprocess.run(
        [sys.executable, "-m", "pykvm", "run", "--image", f"{root},ro", "--image-kernel",
         "--cpus", "2", "-v", "--append",
         systemd_run_words(SYSTEM_STATE_QUESTION)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=str(REPO), timeout=BOOT_TIMEOUT)
    console = done.stdout.decode(errors="replace")
    assert "smpboot: Total of 2 processors activated" in console, console[-3000:]
    # systemd's banner, its distribution name in bold (ANSI escapes on a serial console)
    assert re.search(r"Welcome to \S*Debian GNU/Linux 12 \(bookworm\)", console), console[-3000:]
    state = system_state_answer(console)
    assert state not in (None, "offline"), console[-3000:]
    assert done.returncode == 0, console[-3000:]       # systemd powered the guest off
