"""pykvm.boot.cpio: newc archives, checked byte by byte and against GNU cpio."""

import shutil
import stat
import subprocess

import pytest

from pykvm.boot import cpio
from pykvm.errors import ImageError


def gnu_cpio():
    """The system cpio tool, installed if missing (Debian), else skip."""
    if shutil.which("cpio") is None and shutil.which("apt-get") is not None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "cpio"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if shutil.which("cpio") is None:
        pytest.skip("the cpio tool is not available")
    return "cpio"


def sample_archive() -> bytes:
    return cpio.build_archive([
        cpio.Entry("bin", stat.S_IFDIR | 0o755),
        cpio.Entry("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF" + bytes(range(256)) * 3),
        cpio.Entry("bin/sh", stat.S_IFLNK | 0o777, b"/bin/busybox"),
        cpio.Entry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        cpio.Entry("etc/odd", stat.S_IFREG | 0o600, b"x"),  # 1 byte: 3 bytes of padding
    ])


def test_header_fields_and_alignment():
    data = cpio.build_archive([cpio.Entry("a", stat.S_IFREG | 0o644, b"hello")])
    assert data.startswith(b"070701")
    # header 110 + "a\0" = 112 (aligned); data 5 -> padded to 8; trailer 110 + 11 -> 124
    assert len(data) == 112 + 8 + 124
    header = data[:110]
    assert header[6:14] == b"00000001"          # ino
    assert header[14:22] == b"000081A4"         # regular file 0644
    assert header[46:54] == b"00000000"         # mtime fixed at 0
    assert header[54:62] == b"00000005"         # filesize
    assert header[94:102] == b"00000002"        # namesize includes the NUL
    assert data[112:120] == b"hello\0\0\0"
    assert data[120:].startswith(b"070701") and b"TRAILER!!!\0" in data[120:]
    assert len(data) % 4 == 0


def test_round_trip_through_the_parser():
    entries = list(cpio.read_archive(sample_archive()))
    by_name = {e.name: e for e in entries}
    assert [e.name for e in entries] == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console",
                                         "etc", "etc/odd"]
    assert by_name["dev"].is_dir                    # parent emitted on its own
    assert by_name["bin/sh"].data == b"/bin/busybox"
    assert (by_name["dev/console"].rdev_major, by_name["dev/console"].rdev_minor) == (5, 1)
    assert by_name["etc/odd"].data == b"x"


def test_output_is_deterministic(tmp_path):
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "sub" / "f").write_bytes(b"data")
    (tmp_path / "t" / "link").symlink_to("sub/f")
    first = cpio.build_archive(tree=tmp_path / "t")
    (tmp_path / "t" / "sub" / "f").touch()  # a newer mtime must not matter
    assert cpio.build_archive(tree=tmp_path / "t") == first
    assert sample_archive() == sample_archive()


def test_gnu_cpio_lists_and_extracts(tmp_path):
    tool = gnu_cpio()
    data = sample_archive()
    listing = subprocess.run([tool, "-t", "--quiet"], input=data, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["bin", "bin/busybox", "bin/sh", "dev",
                                               "dev/console", "etc", "etc/odd"]
    out = tmp_path / "x"
    out.mkdir()
    # no device nodes outside a real root: extract everything but dev/console
    subprocess.run([tool, "-i", "--quiet", "--no-absolute-filenames", "-f", "dev/console"],
                   input=data, cwd=out, check=True)
    assert (out / "bin" / "busybox").read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert (out / "bin" / "busybox").stat().st_mode & 0o777 == 0o755
    assert (out / "bin" / "sh").readlink().as_posix() == "/bin/busybox"
    assert (out / "etc" / "odd").read_bytes() == b"x"


def test_tree_matches_gnu_cpio_contents(tmp_path):
    """A host tree packed by pykvm extracts (with GNU cpio) to the same tree."""
    tool = gnu_cpio()
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "file").write_bytes(b"0123456789")
    (src / "a" / "exe").write_bytes(b"#!/bin/sh\n")
    (src / "a" / "exe").chmod(0o750)
    (src / "ln").symlink_to("a/exe")
    dst = tmp_path / "dst"
    dst.mkdir()
    subprocess.run([tool, "-i", "--quiet"], input=cpio.build_archive(tree=src), cwd=dst, check=True)
    assert (dst / "a" / "b" / "file").read_bytes() == b"0123456789"
    assert (dst / "a" / "exe").stat().st_mode & 0o777 == 0o750
    assert (dst / "ln").readlink().as_posix() == "a/exe"


def test_command_archive_keeps_the_command_exact(tmp_path):
    cmd = "echo 'a b' \"$HOME\"\nprintf '%s\\n' é ; exit 3\n"
    entries = list(cpio.read_archive(cpio.command_archive(cmd)))
    assert [(e.name, e.is_dir) for e in entries] == [("pykvm", True), ("pykvm/cmd", False)]
    assert entries[1].data.decode() == cmd
    tool = gnu_cpio()
    subprocess.run([tool, "-i", "--quiet"], input=cpio.command_archive(cmd), cwd=tmp_path, check=True)
    assert (tmp_path / "pykvm" / "cmd").read_text() == cmd


def test_concatenated_archives_stay_aligned():
    """pykvm appends the command archive to the initramfs: both must parse in turn."""
    first, second = sample_archive(), cpio.command_archive("true")
    assert len(first) % 4 == 0
    combined = first + second
    assert list(cpio.read_archive(combined[len(first):]))[-1].data == b"true"


@pytest.mark.parametrize("name", ["", "/", "..", "a/../b", "a\0b"])
def test_bad_names_are_refused(name):
    with pytest.raises(ImageError):
        cpio.build_archive([cpio.Entry(name, stat.S_IFREG | 0o644)])


def test_duplicates_and_truncation_are_refused():
    with pytest.raises(ImageError):
        cpio.build_archive([cpio.Entry("f", stat.S_IFREG), cpio.Entry("/f", stat.S_IFREG)])
    with pytest.raises(ImageError):
        list(cpio.read_archive(sample_archive()[:200]))
