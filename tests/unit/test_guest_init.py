"""The guest's /init (pykvm/guestimage/init.c), run on the host as PID 1 of a PID namespace.

init.c built with -DPYKVM_INIT_HOST_TEST logs its port writes to
/pykvm-test/ports instead of touching real ports, and takes its console from
/pykvm-test/console-active; everything else (mounts, /pykvm/cmd, the
controlling tty, signals, reaping, exit status) is the code the guest runs.
Needs root, unshare (util-linux), gcc with static glibc and busybox-static;
skips without them. Each case takes well under a second here.

Run: python3 -m pytest tests/unit/test_guest_init.py
"""

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

INIT_C = Path(__file__).resolve().parents[2] / "pykvm" / "guestimage" / "init.c"
BUSYBOX = Path("/bin/busybox")
PROGRESS, EXIT = 0xF5, 0xF4

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "gcc")) or not BUSYBOX.exists(),
    reason="needs root, unshare, gcc and busybox-static")


@pytest.fixture(scope="module")
def init_binary(tmp_path_factory):
    binary = tmp_path_factory.mktemp("init") / "init"
    subprocess.run(["gcc", "-static", "-Os", "-Wall", "-Wextra", "-Werror",
                    "-DPYKVM_INIT_HOST_TEST", "-o", str(binary), str(INIT_C)], check=True)
    return binary


@pytest.fixture
def guest_root(tmp_path, init_binary):
    root = tmp_path / "root"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "pykvm-test"):
        (root / d).mkdir(parents=True)
    shutil.copy(init_binary, root / "init")
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True).stdout
    for applet in applets.split():
        if applet not in ("bin/busybox", "sbin/init", "linuxrc"):
            (root / applet).symlink_to("/bin/busybox")
    # "/dev/" + this name reopens init's own stdin (the test's pty) through /proc
    (root / "pykvm-test" / "console-active").write_text("ttyS0 ../proc/self/fd/0\n")
    return root


def boot(root: Path, command: str | None = None, typed: bytes = b"", timeout: float = 20):
    """Run /init in ``root``; returns (console output, [(port, value), ...])."""
    if command is not None:
        (root / "pykvm").mkdir()
        (root / "pykvm" / "cmd").write_text(command)
    master, slave = os.openpty()
    process = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--propagation", "private",
         "chroot", str(root), "/init"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if typed and shell_started(root):
                os.write(master, typed)
                typed = b""
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every slave end closed
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        else:
            pytest.fail(f"/init did not finish in {timeout} s; output so far: {output!r}")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        os.close(master)
    ports_file = root / "pykvm-test" / "ports"
    ports = [tuple(int(x, 0) for x in line.split())
             for line in ports_file.read_text().splitlines()] if ports_file.exists() else []
    return output.decode(errors="replace"), ports


def shell_started(root: Path) -> bool:
    ports = root / "pykvm-test" / "ports"
    return ports.exists() and f"{PROGRESS:#x} 3" in ports.read_text()


def test_command_mode_reports_progress_output_and_status(guest_root):
    output, ports = boot(guest_root, "echo hello from the guest; exit 3")
    assert ports == [(PROGRESS, 1), (PROGRESS, 2), (EXIT, 3)]
    assert "hello from the guest\n" in output      # exact: no "\r\n" in command mode
    assert "pykvm-init" not in output                # no complaint from init


def test_command_text_reaches_the_shell_exactly(guest_root):
    command = "printf '%s|' 'a  b' \"$HOME\" \\\n  'it''s'\necho \"$PATH\""
    output, ports = boot(guest_root, command)
    assert "a  b|/root|its|" in output
    assert "/bin:/sbin:/usr/bin:/usr/sbin" in output
    assert ports[-1] == (EXIT, 0)


def test_file_systems_and_controlling_tty(guest_root):
    command = ("grep -E ' /(proc|sys|dev|dev/pts|tmp|run) ' /proc/mounts | cut -d' ' -f2,3; "
               "test -c /dev/null && echo devnull; test -t 0 && echo has-tty; "
               "sh -c 'exec 3</dev/tty' && echo has-ctty")
    output, ports = boot(guest_root, command)
    for mount in ("/proc proc", "/sys sysfs", "/dev devtmpfs", "/dev/pts devpts", "/tmp tmpfs",
                  "/run tmpfs"):
        assert mount in output
    assert "devnull" in output and "has-tty" in output and "has-ctty" in output
    assert ports[-1] == (EXIT, 0)


def test_a_signal_becomes_128_plus_its_number(guest_root):
    _, ports = boot(guest_root, "kill -KILL $$")
    assert ports[-1] == (EXIT, 128 + 9)


@pytest.mark.parametrize("applet", ["poweroff", "reboot", "halt"])
def test_power_applets_end_the_guest_with_0(guest_root, applet):
    output, ports = boot(guest_root, f"{applet}; sleep 5; exit 9")
    assert ports[-1] == (EXIT, 0), output


def test_orphans_are_reaped(guest_root):
    # Orphaned children are reparented to PID 1; a zombie would show as "Z".
    command = "(sleep 0.1 &); (sleep 0.1 &); sleep 0.5; ps -o stat | grep -c '^Z' ; true"
    output, ports = boot(guest_root, command)
    assert output.strip().splitlines()[-1] == "0"
    assert ports[-1] == (EXIT, 0)


def test_missing_shell_is_reported_not_panicked(guest_root):
    (guest_root / "bin" / "sh").unlink()
    output, ports = boot(guest_root, "true")
    assert "pykvm-init: cannot run /bin/sh" in output
    assert ports[-1] == (EXIT, 127)


def test_shell_mode_runs_an_interactive_shell_on_the_console(guest_root):
    output, ports = boot(guest_root, typed=b"echo typed-$((6*7)); exit 7\n")
    assert ports == [(PROGRESS, 1), (PROGRESS, 3), (EXIT, 7)]
    assert "typed-42" in output
    assert "can't access tty" not in output  # job control is on: the tty is controlling
