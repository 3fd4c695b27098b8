"""Bad command lines and hostile files: each is one line on stderr and exit status 2, never
a traceback, an "internal error", a hang or unbounded memory (issue 12, items 4, 5, 8).

Real files throughout: /dev/zero, a FIFO nobody writes, a 20 GiB sparse file, a directory,
a snapshot directory without a snapshot in it.
"""

import gzip
import lzma
import os
import resource
import subprocess
import sys

import pytest

from pykvm.errors import ImageError
from pykvm.images import read_image_file

from ..conftest import needs_kvm

TIMEOUT = 60


def pykvm(*args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                          preexec_fn=preexec_fn)


def assert_bad_input(result, *fragments):
    """One line on stderr naming the problem, exit status 2."""
    assert "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pykvm: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.returncode == 2, (result.returncode, result.stderr)


@pytest.fixture
def files(tmp_path):
    """Named hostile files: {name: path}."""
    flat = tmp_path / "guest.bin"
    flat.write_bytes(b"\xf4")                      # hlt
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(20 << 30)                  # 20 GiB, no blocks
    text = tmp_path / "notes.txt"
    text.write_text("not a kernel\n" * 100)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    return {"FLAT": str(flat), "FIFO": str(fifo), "SPARSE": str(sparse), "TEXT": str(text),
            "EMPTY": str(empty), "DIR": str(tmp_path), "MISSING": str(tmp_path / "missing"),
            "SNAPSHOT": str(snapshot), "SOCK": str(tmp_path / "vm.sock")}


BAD_COMMAND_LINES = [
    # images (item 4): special files, huge files, missing and empty ones
    (["run", "--kernel", "/dev/zero"], ["character device", "not a regular file"]),
    (["run", "--flat", "/dev/zero"], ["character device"]),
    (["run", "--flat", "FIFO"], ["FIFO"]),
    (["run", "--kernel", "FIFO"], ["FIFO"]),
    (["run", "--flat", "SPARSE"], ["larger than pykvm accepts"]),
    (["run", "--kernel", "SPARSE"], ["larger than pykvm accepts"]),
    (["run", "--kernel", "TEXT", "--initrd", "/dev/zero"], ["initrd", "character device"]),
    (["run", "--kernel", "TEXT", "--initrd", "FIFO"], ["initrd", "FIFO"]),
    (["run", "--kernel", "TEXT"], ["not a Linux kernel image"]),
    (["run", "--flat", "DIR"], ["is a directory"]),
    (["run", "--flat", "MISSING"], ["not found"]),
    (["run", "--flat", "EMPTY"], ["empty"]),
    # memory (item 5) and other sizes
    (["run", "--flat", "FLAT", "--mem", "1T"], ["more than this host has"]),
    (["run", "--flat", "FLAT", "--mem", "200G"], ["more than this host has"]),
    (["run", "--flat", "FLAT", "--mem", "2T"], ["too large"]),
    (["run", "--flat", "FLAT", "--mem", "0"], ["must be positive"]),
    (["run", "--flat", "FLAT", "--mem", "1M"], ["too small"]),
    (["run", "--flat", "FLAT", "--mem", "12345B"], ["multiple of 4 KiB"]),
    (["run", "--flat", "FLAT", "--mem", "lots"], ["cannot read the size"]),
    (["run", "--flat", "FLAT", "--cpus", "0"], ["--cpus"]),
    (["run", "--flat", "FLAT", "--cpus", "256"], ["--cpus"]),
    # the KVM device (item 8)
    (["run", "--flat", "FLAT", "--device", "/dev/null"], ["not a KVM device", "ENOTTY"]),
    (["run", "--flat", "FLAT", "--device", "TEXT"], ["not a KVM device"]),
    (["run", "--flat", "FLAT", "--device", "DIR"], ["not a KVM device"]),
    # options that do not go together, or say nothing
    (["run", "--flat", "FLAT", "--", "echo", "hi"], ["cannot go with --flat"]),
    (["run", "--flat", "FLAT", "--agent"], ["need a Linux guest"]),
    (["run", "--flat", "FLAT", "--stats-interval", "0"], ["--stats-interval"]),
    (["run", "--flat", "FLAT", "--gdb", "tcp:0"], ["--gdb", "not a TCP port"]),
    (["run", "--flat", "FLAT", "--gdb", "127.0.0.1:99999"], ["--gdb", "not a TCP port"]),
    (["run", "--flat", "FLAT", "--gdb", "1234"], ["--gdb 1234", "tcp:1234"]),
    (["run", "--flat", "FLAT", "--gdb", "TEXT"], ["--gdb", "not a socket"]),
    (["run", "--flat", "FLAT", "--gdb", "MISSING/g.sock"], ["--gdb", "cannot listen"]),
    (["run", "--flat", "FLAT", "--api-sock", "TEXT"], ["not a socket"]),
    (["run", "--flat", "FLAT", "--disk", "MISSING"], ["MISSING"]),
    (["run", "--flat", "FLAT", "--api-sock", "SOCK", "--api-sock-group", "no-such-group-x"],
     ["no-such-group-x"]),
    (["run", "--flat", "FLAT", "--api-sock-group", "root"], ["--api-sock-group"]),
    # snapshots: a directory that holds none, options that would build another machine
    (["run", "--restore", "SNAPSHOT"], ["SNAPSHOT"]),
    (["run", "--restore", "MISSING"], ["MISSING"]),
    (["run", "--restore", "SNAPSHOT", "--mem", "1G"], ["drop --mem"]),
    # the clients
    (["ctl", "SOCK", "reboot"], ["unknown action"]),
    (["ctl", "SOCK", "snapshot"], ["snapshot directory"]),
    (["ctl", "SOCK", "pause", "now"], ["takes no arguments"]),
    (["exec", "--api-sock", "SOCK"], ["give the command"]),
    (["exec", "--api-sock", "SOCK", "--env", "FOO", "--", "true"], ["NAME=VALUE"]),
    (["exec", "--api-sock", "SOCK", "--timeout", "-1", "--", "true"], ["--timeout"]),
    (["cp", "--api-sock", "SOCK", "a", "b"], ["exactly one"]),
]


@needs_kvm
@pytest.mark.parametrize("words, fragments", BAD_COMMAND_LINES,
                         ids=[" ".join(words) for words, _ in BAD_COMMAND_LINES])
def test_bad_command_line_is_one_line_and_status_2(files, words, fragments):
    args = [files.get(word, word) for word in words]
    wanted = [files[f] if f in files else f for f in fragments]
    assert_bad_input(pykvm(*args), *wanted)


# --- item 4: images are checked before they are read, and every read is bounded -----------------
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="is a FIFO, not a regular file"):
        read_image_file(fifo, "flat binary")


def test_a_character_device_is_refused_before_it_is_read():
    with pytest.raises(ImageError, match="/dev/zero: is a character device"):
        read_image_file("/dev/zero")


def test_a_sparse_file_is_refused_by_its_size_without_reading_it(tmp_path):
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(20 << 30)
    # RLIMIT_AS would stop a read of 20 GiB; the check comes first, so none happens.
    with pytest.raises(ImageError, match="larger than pykvm accepts"):
        read_image_file(sparse, "flat binary")
    with pytest.raises(ImageError, match="larger than pykvm accepts"):
        read_image_file(sparse, "flat binary", limit=4096)


def test_a_file_that_grows_past_the_limit_while_read_is_refused(tmp_path):
    path = tmp_path / "grows.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(ImageError, match="larger than pykvm accepts"):
        read_image_file(path, "kernel", limit=99)
    assert read_image_file(path, "kernel", limit=100) == b"x" * 100


@pytest.mark.parametrize("kind, compress", [("gzip", gzip.compress),
                                            ("xz", lambda d: lzma.compress(d, lzma.FORMAT_XZ))])
def test_a_decompression_bomb_in_a_kernel_payload_is_bounded(monkeypatch, kind, compress):
    from pykvm.boot import payload

    monkeypatch.setattr(payload, "MAX_VMLINUX_SIZE", 1 << 20)
    bomb = compress(b"\x7fELF" + bytes(8 << 20))          # 8 MiB out of a few KiB
    assert len(bomb) < 64 << 10
    with pytest.raises(ImageError, match=f"the {kind} kernel payload decompresses to more"):
        payload.decompress_payload(bomb, "bzImage")
    # below the bound the same stream is a kernel
    monkeypatch.setattr(payload, "MAX_VMLINUX_SIZE", 16 << 20)
    assert len(payload.decompress_payload(bomb, "bzImage")) == 4 + (8 << 20)


def test_a_zstd_bomb_is_bounded(monkeypatch):
    zstandard = pytest.importorskip("zstandard")
    from pykvm.boot import payload

    monkeypatch.setattr(payload, "MAX_VMLINUX_SIZE", 1 << 20)
    compressor = zstandard.ZstdCompressor().compressobj()   # streamed: no content size
    bomb = compressor.compress(b"\x7fELF" + bytes(8 << 20)) + compressor.flush()
    with pytest.raises(ImageError, match="the zstd kernel payload decompresses to more"):
        payload.decompress_payload(bomb, "bzImage")


# --- item 5: guest RAM the host cannot give -------------------------------------------------------
@needs_kvm
def test_guest_ram_the_host_refuses_to_map_is_one_line(files):
    """Under an address-space limit the mmap of guest RAM fails with ENOMEM: a typed
    error, not "internal error: OSError"."""
    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))

    result = pykvm("run", "--flat", files["FLAT"], "--mem", "2G", preexec_fn=limit_address_space)
    assert_bad_input(result, "cannot map 2 GiB of guest RAM", "ENOMEM")


# --- item 8: statuses -------------------------------------------------------------------------
def test_a_snapshot_restore_refusal_exits_2(files):
    from pykvm.cli import exit_status
    from pykvm.snapshot.state import SnapshotError

    assert exit_status(SnapshotError("state.json: bad")) == 2
    assert_bad_input(pykvm("run", "--restore", files["SNAPSHOT"]), files["SNAPSHOT"])
