"""The command line kvm_pvm hosts give Debian's kernels (pykvm/quirks/cmdline.py): which
kernels get it, that a user's word with the same key replaces pykvm's, and that the
kernel is recognised from its bzImage header alone (pykvm/boot/bzimage.py)."""

from __future__ import annotations

import concurrent.futures
import os
import struct

import pytest

from pykvm.boot import bzimage
from pykvm.boot.bzimage import version_of_file
from pykvm.quirks import Quirks
from pykvm.quirks.cmdline import DEBIAN_WORDS, is_debian, key, merge
from pykvm.quirks.pvm import LINUX_CMDLINE, PvmQuirks

DEBIAN = ("6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC "
          "Debian 6.1.192-3 (2026-11-26)")
PYKVM = "6.1.192 (pykvm@pykvm) #1 SMP 2024-01-01 00:00:00 UTC"


def fake_bzimage(path, version: str | None, setup_sects: int = 2):
    """The setup code of a bzImage: HdrS and a kernel_version pointer to ``version``."""
    data = bytearray((setup_sects + 1) * bzimage.SECTOR_SIZE)
    data[bzimage.SETUP_SECTS] = setup_sects
    data[bzimage.HEADER:bzimage.HEADER + 4] = bzimage.HDRS_MAGIC
    if version is not None:
        at = 0x400
        data[at:at + len(version) + 1] = version.encode() + b"\0"
        struct.pack_into("<H", data, bzimage.KERNEL_VERSION, at - 0x200)
    path.write_bytes(bytes(data) + b"\x90" * 4096)   # the protected-mode code, never read
    return path


def test_the_version_is_read_from_the_setup_code(tmp_path):
    assert version_of_file(fake_bzimage(tmp_path / "deb", DEBIAN)) == DEBIAN
    assert version_of_file(fake_bzimage(tmp_path / "none", None)) is None
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(2000))
    assert version_of_file(tmp_path / "elf") is None
    assert version_of_file(tmp_path / "missing") is None


def test_a_version_pointer_outside_the_setup_code_is_ignored(tmp_path):
    path = fake_bzimage(tmp_path / "k", DEBIAN, setup_sects=1)   # 1024 bytes of setup
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, bzimage.KERNEL_VERSION, 0x1000)  # -> 0x1200, past it
    path.write_bytes(bytes(data))
    assert version_of_file(path) is None


def test_a_fifo_or_device_has_no_version_and_is_never_waited_on(tmp_path):
    """The command line is built before the kernel is loaded: reading the version must go
    through images.py's checks (a FIFO nobody writes blocked `pykvm run --kernel FIFO`)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        version = pool.submit(version_of_file, fifo)
        try:
            assert version.result(timeout=10) is None
        finally:
            if not version.done():    # unblock the open so the pool can shut down
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert version_of_file("/dev/zero") is None
    assert version_of_file(tmp_path) is None


def test_only_debian_kernels_get_the_debian_words():
    assert is_debian(DEBIAN) and not is_debian(PYKVM) and not is_debian(None)
    quirks = PvmQuirks()
    ours = quirks.adjust_cmdline("console=ttyS0", PYKVM)
    assert ours == f"console=ttyS0 {LINUX_CMDLINE}"
    theirs = quirks.adjust_cmdline("console=ttyS0", DEBIAN)
    assert theirs == " ".join(["console=ttyS0", LINUX_CMDLINE, *DEBIAN_WORDS])
    assert "initcall_blacklist=ftrace_check_for_weak_functions," in theirs
    assert Quirks().adjust_cmdline("console=ttyS0", DEBIAN) == "console=ttyS0"   # VT-x/AMD-V


@pytest.mark.parametrize("user", ["mitigations=auto", "initcall_blacklist=", "audit=1"])
def test_a_users_word_replaces_pykvms_word_with_the_same_key(user):
    line = PvmQuirks().adjust_cmdline(f"console=ttyS0 {user}", DEBIAN)
    assert [word for word in line.split() if key(word) == key(user)] == [user]
    assert all(word in line.split() for word in DEBIAN_WORDS if key(word) != key(user))


def test_merge_adds_only_missing_keys():
    assert merge("  a=1 b ", ["a=2", "b", "c=3"]) == "a=1 b c=3"
    assert merge("", ["x"]) == "x"


def cmdline_of(kernel, quirks, clock_slowdown: int = 0) -> str:
    """machine/boot.py's command line for a machine with no devices on a 2 GHz TSC."""
    from types import SimpleNamespace

    from pykvm.machine import MachineConfig
    from pykvm.machine.boot import linux_cmdline

    config = MachineConfig(kernel=kernel, clock_slowdown=clock_slowdown)
    config.validate()
    cpu = SimpleNamespace(tsc_khz=lambda: 2_000_000)
    machine = SimpleNamespace(config=config, virtio=None,
                              vm=SimpleNamespace(vcpus=[cpu], quirks=quirks))
    (word,) = [word for word in linux_cmdline(machine).split() if key(word) == "tsc_early_khz"]
    return word


def test_debian_kernels_keep_a_slower_clock_where_ring_0_is_emulated(tmp_path):
    """Debian's kernels on kvm_pvm are told their TSC is DEBIAN_CLOCK_SLOWDOWN times faster
    (fewer timer ticks per real second); pykvm's own kernel and VT-x/AMD-V hosts keep real
    time, and --clock-slowdown overrides the default either way."""
    from pykvm.quirks.cmdline import DEBIAN_CLOCK_SLOWDOWN

    debian, ours = fake_bzimage(tmp_path / "deb", DEBIAN), fake_bzimage(tmp_path / "ours", PYKVM)
    assert DEBIAN_CLOCK_SLOWDOWN == 10
    assert cmdline_of(debian, PvmQuirks()) == "tsc_early_khz=20000000"
    assert cmdline_of(ours, PvmQuirks()) == "tsc_early_khz=2000000"
    assert cmdline_of(debian, Quirks()) == "tsc_early_khz=2000000"
    assert cmdline_of(debian, PvmQuirks(), clock_slowdown=1) == "tsc_early_khz=2000000"
    assert cmdline_of(ours, Quirks(), clock_slowdown=3) == "tsc_early_khz=6000000"


@pytest.mark.parametrize("slowdown", [-1, 101])
def test_a_clock_slowdown_out_of_range_is_refused(slowdown):
    from pykvm.errors import ConfigError
    from pykvm.machine import MachineConfig

    with pytest.raises(ConfigError, match=rf"--clock-slowdown {slowdown}: must be between 1 "
                                          r"and 100 \(0: the host's default\)"):
        MachineConfig(kernel="k", clock_slowdown=slowdown).validate()


def test_systemd_run_words_ask_systemd_for_one_command_and_a_power_off():
    from pykvm.distro.boot import systemd_run_words
    from pykvm.errors import ConfigError

    words = systemd_run_words("/usr/bin/systemctl is-system-running")
    assert words.split(" systemd.")[0] == 'systemd.run="/usr/bin/systemctl is-system-running"'
    assert "systemd.run_success_action=poweroff" in words
    assert "systemd.journald.forward_to_console=1" in words
    for bad in ('echo "x"', "  "):
        with pytest.raises(ConfigError, match="systemd.run="):
            systemd_run_words(bad)


def test_system_state_answer_reads_systemctl_from_the_journal_on_the_console():
    from pykvm.distro.boot import system_state_answer

    log = ("[ 1012.5] systemd[1]: Starting kernel-command-line.service...\n"
           "[ 1028.1] systemctl[231]: initializing\n"
           "[ 1029.0] systemctl[232]: running\n")
    assert system_state_answer(log) == "initializing"          # the first answer
    assert system_state_answer("[ 3.0] systemctl[9]: offline") == "offline"
    assert system_state_answer("Starting systemctl is-system-running") is None
    assert system_state_answer("systemctl[12]: initializingfoo") is None
