"""Debian's own kernels booted by pykvm (issue #15 item 2), as a user would:

    pykvm run --kernel /boot/vmlinuz-6.1.0-57-cloud-amd64 --cpus 2 -- 'cat /sys/devices/system/cpu/online'

The kernel is Debian's package, fetched with ``apt-get download`` into pykvm's cache and
unpacked with ``dpkg-deb -x`` (pykvm/distro/kernel.py); the initramfs is pykvm's own (the
default guest's /init runs the command and reports its exit status). On kvm_pvm pykvm
adds the Debian command line (pykvm/quirks/cmdline.py); the boot still takes many minutes
there (bench/RESULTS.md), so these tests are ``slow``: run them with PYKVM_SLOW_TESTS=1.
One boot answers every question a test asks of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..guest_shell import REPO

pytestmark = [pytest.mark.linux, pytest.mark.slow]

BOOT_TIMEOUT = 3600        # seconds: a Debian kernel's boot where ring 0 is emulated
REPO = Path(__file__).resolve().parents[2]


def debian_kernel(flavour: str):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch Debian's kernel")
    from pykvm.distro.kernel import fetch
    return fetch(flavour)


def run_in_guest(kernel, cpus: int, command: str, log: Path) -> tuple[int, str, float]:
    """``pykvm run --kernel KERNEL --cpus N --cold -- COMMAND``: (status, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    with open(log, "wb") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "pykvm", "run", "--kernel", str(kernel.vmlinuz),
             "--cpus", str(cpus), "--cold", "-v", "--", command],
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
            cwd=str(REPO), timeout=BOOT_TIMEOUT)
    return done.returncode, done.stdout.decode(errors="replace"), time.monotonic() - started


def test_debian_cloud_kernel_brings_up_two_cpus(tmp_path):
    kernel = debian_kernel("cloud")
    log = tmp_path / "boot.log"
    status, output, seconds = run_in_guest(
        kernel, 2, "cat /sys/devices/system/cpu/online; uname -r; "
                   "grep -c ^processor /proc/cpuinfo", log)
    console = log.read_text(errors="replace")
    assert status == 0, f"status {status} after {seconds:.0f} s:\n{console[-3000:]}"
    assert output.split() == ["0-1", kernel.release, "2"], output
    # pykvm's Debian command line reached the kernel (it prints what it was given).
    assert "initcall_blacklist=ftrace_check_for_weak_functions" in console
    assert "smpboot: Total of 2 processors activated" in console, console[-3000:]
