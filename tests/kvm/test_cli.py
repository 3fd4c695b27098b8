"""The `pykvm` command as a user meets it: reports, exit codes, and one-line errors."""

import struct
import subprocess
import sys
import time

import pytest

from ..asm import assemble
from ..conftest import needs_kvm


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


def test_library_log_records_are_one_line_each(capsys):
    """What library code logs (pykvm/cli/logs.py): `pykvm: ` and the first line, an
    attached exception as its type and first line, never a traceback; info is quiet."""
    import logging

    from pykvm.cli.logs import LineHandler, install

    handler = install(debug=False)
    try:
        log = logging.getLogger("pykvm.test_cli")
        log.info("not shown")
        log.warning("first line\nsecond line")
        try:
            raise OSError(5, "Input/output error")
        except OSError:
            log.exception("closing devices")
        assert capsys.readouterr().err == ("pykvm: first line\n"
                                           "pykvm: closing devices: OSError: [Errno 5] "
                                           "Input/output error\n")
        assert install(debug=False) is handler        # once per process
        assert sum(isinstance(h, LineHandler) for h in logging.getLogger("pykvm").handlers) == 1
    finally:
        logging.getLogger("pykvm").removeHandler(handler)


@needs_kvm
@pytest.mark.skipif(sys.platform != "linux" or __import__("os").geteuid() != 0,
                    reason="runs a client as another uid")
def test_what_the_gdb_stub_logs_is_one_pykvm_line(tmp_path):
    """A refused gdb client is logged by pykvm/gdb/listen.py; `pykvm run` shows the record
    as one `pykvm: ` line (without the CLI's handler it came out unprefixed)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from .test_control_socket import NOBODY, exchange_as_user

    public = Path(tempfile.mkdtemp(prefix="pykvm-gdb-"))   # tmp_path's parents are 0700
    public.chmod(0o755)
    flat = tmp_path / "spin.bin"
    flat.write_bytes(assemble("1: hlt\n jmp 1b", "real", 0x10000))
    sock = public / "gdb.sock"
    vm = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--flat", str(flat),
                           "--gdb", str(sock)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if sock.exists():
                break
            time.sleep(0.1)
        os.chmod(sock, 0o666)
        assert exchange_as_user(NOBODY, NOBODY, sock, b"$c#63") == b""
        time.sleep(0.5)
        vm.terminate()
        _, stderr = vm.communicate(timeout=30)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        shutil.rmtree(public, ignore_errors=True)
    refused = [line for line in stderr.splitlines() if "connection refused" in line]
    assert refused == [f"pykvm: gdb: connection refused: uid {NOBODY} may not use this socket"], \
        stderr
    assert "Traceback" not in stderr
