"""Real Linux boots of the default guest (`make guest`). Slow on kvm_pvm hosts
(minutes per boot), so each boot serves many assertions."""

import json
import os
import select
import subprocess
import sys
import time

import pytest

from pykvm.machine import default_guest_dir

from ..conftest import needs_kvm

GUEST = default_guest_dir()
BOOT_TIMEOUT = 900  # seconds; a boot takes a few minutes on kvm_pvm, seconds elsewhere

pytestmark = [
    pytest.mark.linux,
    needs_kvm,
    pytest.mark.skipif(GUEST is None, reason="the default Linux guest is not built (make guest)"),
]


def pykvm(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True,
                          text=True, timeout=BOOT_TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def manifest():
    path = GUEST / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture(scope="module")
def command_boot():
    """One boot running a script whose parts the tests below read; it exits 7."""
    script = (
        "echo release=$(uname -r); "
        "grep MemTotal /proc/meminfo; "
        "echo round-trip-$((6*7)) > /tmp/file && cat /tmp/file; "
        "echo to-stderr >&2; "
        "exit 7"
    )
    started = time.monotonic()
    result = pykvm("run", "--mem", "256M", "--stats", "--", script)
    result.elapsed = time.monotonic() - started
    return result


def test_command_exit_status_is_pykvm_exit_status(command_boot):
    assert command_boot.returncode == 7, command_boot.stderr[-3000:]


def test_command_prints_the_kernel_release(command_boot, manifest):
    lines = command_boot.stdout.splitlines()
    release = [line.split("=", 1)[1] for line in lines if line.startswith("release=")]
    assert release, command_boot.stdout
    if manifest.get("kernel_release"):
        assert release[0] == manifest["kernel_release"]


def test_guest_sees_the_configured_memory(command_boot):
    total_kib = int(next(line.split()[1] for line in command_boot.stdout.splitlines()
                         if line.startswith("MemTotal")))
    # The kernel keeps its own image and reserved ranges out of MemTotal.
    assert 200 * 1024 < total_kib <= 256 * 1024


def test_tmpfs_round_trip(command_boot):
    assert "round-trip-42" in command_boot.stdout.splitlines()


def test_only_the_command_output_is_on_stdout(command_boot):
    # Kernel messages go to the boot log, not to the command's stdout.
    assert "Linux version" not in command_boot.stdout
    assert "Run /init" not in command_boot.stdout
    assert "to-stderr" in command_boot.stdout + command_boot.stderr


def test_stats_show_the_boot(command_boot):
    assert "exit io" in command_boot.stderr
    assert "boot milestones" in command_boot.stderr and "init " in command_boot.stderr


def test_interactive_shell_answers_typed_commands():
    process = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--mem", "128M"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        output = read_until(process, b"# ", BOOT_TIMEOUT)
        process.stdin.write(b"echo typed-$((40+2))\n")
        process.stdin.flush()
        output += read_until(process, b"typed-42", 120)
        process.stdin.write(b"poweroff\n")
        process.stdin.flush()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert b"typed-42" in output
    assert process.returncode == 0, process.stderr.read()[-2000:]


def read_until(process, marker: bytes, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    seen = b""
    fd = process.stdout.fileno()
    while marker not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            raise AssertionError(f"did not see {marker!r}; output so far:\n{seen[-3000:]!r}")
        ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
        if ready:
            seen += os.read(fd, 65536)
    return seen
