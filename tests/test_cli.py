"""The `pykvm` command as a user meets it: reports, exit codes, and one-line errors."""

import struct
import subprocess
import sys
import time

import pytest

from .asm import assemble
from .conftest import needs_kvm


def pykvm(*args, input=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True,
                          text=True, input=input, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pykvm: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@needs_kvm
def test_check_reports_the_host():
    result = pykvm("check")
    assert result.returncode == 0, result.stdout
    assert "KVM API version: 12" in result.stdout
    assert "host kind: kvm_" in result.stdout
    assert "KVM acceleration can be used" in result.stdout
    from pykvm.kvm import detect_host_kind
    if detect_host_kind() == "kvm_pvm":
        assert "quirks pykvm works around" in result.stdout and "int3" in result.stdout


def test_check_without_kvm_fails_clearly(tmp_path):
    result = pykvm("check", "--device", str(tmp_path / "kvm"))
    assert result.returncode == 1
    assert "does not exist" in result.stdout and "can NOT be used" in result.stdout


def test_run_without_kvm_is_one_line(tmp_path):
    flat = tmp_path / "g.bin"
    flat.write_bytes(b"\xf4")
    assert_one_line_error(pykvm("run", "--flat", str(flat), "--device", str(tmp_path / "kvm")),
                          "does not exist")


@needs_kvm
def test_flat_guest_runs_with_stats(tmp_path):
    flat = tmp_path / "hello.bin"
    flat.write_bytes(assemble("""
        mov $0x3f8, %dx
        mov $'o', %al
        out %al, %dx
        out %al, %dx
        mov $0xf4, %dx
        mov $3, %al
        out %al, %dx"""))
    result = pykvm("run", "--flat", str(flat), "--stats")
    assert result.returncode == 3
    assert result.stdout == "oo"
    assert "exit io" in result.stderr and "port 0x03f8 out" in result.stderr


@needs_kvm
def test_flat_image_larger_than_ram(tmp_path):
    flat = tmp_path / "big.bin"
    flat.write_bytes(b"\x90" * (3 << 20))
    assert_one_line_error(pykvm("run", "--flat", str(flat), "--mem", "2M"), "does not fit")


@pytest.mark.parametrize("content, fragment", [
    (None, "not found"),
    (b"", "empty"),
], ids=["missing", "empty"])
def test_unreadable_flat_images(tmp_path, content, fragment):
    flat = tmp_path / "g.bin"
    if content is not None:
        flat.write_bytes(content)
    assert_one_line_error(pykvm("run", "--flat", str(flat)), fragment)


def bzimage_header(xloadflags=1, version=0x020F) -> bytes:
    image = bytearray(0x4000)
    image[0x1F1] = 1                                  # setup_sects
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = b"\xeb\x66"                  # jmp over the header: its length
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    struct.pack_into("<H", image, 0x236, xloadflags)
    return bytes(image)


@needs_kvm
@pytest.mark.parametrize("content, fragment", [
    (b"this is not a kernel" * 100, "not a Linux kernel"),
    (bzimage_header(xloadflags=0), "64-bit"),
], ids=["garbage", "no-64-bit-entry"])
def test_bad_kernels_are_one_line_errors(tmp_path, content, fragment):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(content)
    assert_one_line_error(pykvm("run", "--kernel", str(kernel), "--mem", "64M"), fragment)


@needs_kvm
def test_missing_kernel(tmp_path):
    assert_one_line_error(pykvm("run", "--kernel", str(tmp_path / "nope"), "--mem", "64M"), "nope")


def test_nothing_after_double_dash_is_an_error():
    assert_one_line_error(pykvm("run", "--"), "nothing after --")


@needs_kvm
def test_stat_shows_a_running_vm_live(tmp_path):
    flat = tmp_path / "spin.bin"
    flat.write_bytes(assemble("1: mov $0x80, %dx\n out %al, %dx\n jmp 1b", "long", 0x10000))
    socket_path = tmp_path / "vm.sock"
    vm = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--flat", str(flat), "--entry",
                           "long", "--api-sock", str(socket_path)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if socket_path.exists():
                break
            time.sleep(0.1)
        time.sleep(0.5)
        result = pykvm("stat", str(socket_path))
        assert result.returncode == 0, result.stderr
        assert "exit io" in result.stdout and "port 0x0080 out" in result.stdout
        assert "time: guest (inside KVM_RUN" in result.stdout
        assert pykvm("ctl", str(socket_path), "stop").returncode == 0
        assert vm.wait(timeout=30) == 0
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
