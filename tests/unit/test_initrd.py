"""pykvm/boot/initrd.py: an initramfs's compressed members decompressed by pykvm, the
file tree unchanged, and anything it cannot read left to the kernel."""

from __future__ import annotations

import gzip
import lzma

import pytest
import zstandard

from pykvm.boot.cpio import build_archive, read_archive, Entry
from pykvm.boot.initrd import decompressed

MiB = 1 << 20


def archive(*files: tuple[str, bytes]) -> bytes:
    return build_archive([Entry(name, 0o100644, data) for name, data in files])


def tree(data: bytes) -> dict[str, bytes]:
    """What the kernel would unpack, members in order (a later entry replaces one)."""
    files, position = {}, 0
    while position < len(data):
        if data[position] == 0:
            position += 1
            continue
        for entry in read_archive(data[position:]):
            if entry.name != "TRAILER!!!":
                files[entry.name] = entry.data
        position = data.index(b"TRAILER!!!", position) + 10
    return files


EARLY = archive(("kernel/x86/microcode/AuthenticAMD.bin", b"u" * 1000))
MAIN = archive(("init", b"#!/bin/sh\n"), ("lib/modules/virtio_blk.ko", bytes(range(256)) * 400))
TAIL = archive(("pykvm/command", b"uname -a"))


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress,
                                      zstandard.ZstdCompressor().compress])
def test_compressed_members_are_decompressed_between_plain_ones(compress):
    packed = EARLY + compress(MAIN)                 # initramfs-tools' layout
    packed += b"\0" * (-len(packed) % 4 + 4) + TAIL  # + pykvm's command, 4-byte aligned
    out = decompressed(packed, 16 * MiB)
    assert out != packed and b"\x1f\x8b" not in out[:len(EARLY) + 8]
    assert tree(out) == {**tree(EARLY), **tree(MAIN), **tree(TAIL)}
    assert out.startswith(EARLY) and out.endswith(TAIL)


def test_an_uncompressed_initramfs_is_given_back_as_it_is():
    plain = EARLY + TAIL
    assert decompressed(plain, 16 * MiB) is plain
    other = b"I" * 5000                       # not an initramfs pykvm knows: the kernel's
    assert decompressed(other, 16 * MiB) is other


def test_a_bomb_or_a_broken_stream_goes_to_the_kernel_as_it_came():
    bomb = EARLY + gzip.compress(archive(("zeros", bytes(8 * MiB))))
    assert decompressed(bomb, 4 * MiB) is bomb                  # over the limit
    assert decompressed(bomb, 16 * MiB) is not bomb
    truncated = EARLY + zstandard.ZstdCompressor().compress(MAIN)[:-20]
    assert decompressed(truncated, 16 * MiB) is truncated       # the stream does not end
    corrupt = EARLY + b"\x1f\x8b\x08\x00" + b"\xff" * 64
    assert decompressed(corrupt, 16 * MiB) is corrupt
    bad_cpio = b"070701" + b"zz" * 60
    assert decompressed(bad_cpio + gzip.compress(MAIN), 16 * MiB).startswith(bad_cpio)


def test_the_loader_puts_the_decompressed_initramfs_in_guest_ram(tmp_path):
    from pykvm.boot.linux import load_linux
    from pykvm.memory import GuestMemory

    from .test_boot_loader import VMLINUX, write

    packed = EARLY + gzip.compress(MAIN)
    with GuestMemory.anonymous(64 * MiB) as memory:
        boot = load_linux(memory, write(tmp_path, "vmlinux", VMLINUX), initrd=packed)
        loaded = memory.read(boot.initrd_addr, boot.initrd_size)
    assert tree(loaded) == {**tree(EARLY), **tree(MAIN)} and loaded != packed
