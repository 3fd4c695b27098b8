"""An initramfs handed to Linux already decompressed.

Why: a distribution's initramfs is compressed (Debian's initramfs-tools: zstd, after an
uncompressed early cpio), and the guest kernel decompresses it in ring 0 before it
unpacks it. Where guest ring 0 is emulated instruction by instruction (kvm_pvm,
docs/hosts.md) that costs minutes; pykvm decompresses in a fraction of a second.

What: the kernel reads its initramfs as a sequence of members, each a newc cpio archive,
either as it is or compressed, with zero bytes between them ignored
(Documentation/driver-api/early-userspace/buffer-format.rst, init/initramfs.c
unpack_to_rootfs). :func:`decompressed` keeps every uncompressed member, replaces each
gzip, xz or zstd member by its output, and keeps anything else as it was from there on
(the kernel knows formats pykvm does not decompress: bzip2, lzma, lzo, lz4).

Bounded: the output may not exceed ``limit`` bytes (a decompression bomb, or an initramfs
too big for the guest's RAM once uncompressed); past it, or on any stream pykvm cannot
read to its end, the initramfs goes to the guest as it came, and the kernel decompresses
it (and reports any error) itself. The result is the same file tree either way.
"""

from __future__ import annotations

import lzma
import zlib

CPIO_MAGICS = (b"070701", b"070702")      # newc, and newc with checksums
CPIO_HEADER = 110
TRAILER = b"TRAILER!!!"
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
STEP = 64 << 10                            # compressed bytes fed per step (bounds the output)


class _Unreadable(Exception):
    """A member pykvm cannot take apart: leave the rest to the kernel."""


def decompressed(data: bytes, limit: int) -> bytes:
    """``data`` with its compressed members decompressed, or ``data`` itself when that
    would exceed ``limit`` bytes or a member cannot be read to its end."""
    pieces: list[bytes | memoryview] = []
    size, position, view = 0, 0, memoryview(data)
    changed = False
    try:
        while position < len(data):
            if data[position] == 0:                      # padding between members
                position += 1
                continue
            head = bytes(view[position:position + 6])
            if head in CPIO_MAGICS and not position & 3:    # the kernel's test, too
                end = _cpio_end(view, position)
                piece: bytes | memoryview = view[position:end]
            elif head.startswith((GZIP_MAGIC, XZ_MAGIC, ZSTD_MAGIC)):
                piece, end = _decompress(view, position, limit - size)
                changed = True
            else:
                piece, end = view[position:], len(data)     # for the kernel to read
            size += len(piece)
            if size > limit:
                return data
            pieces.append(piece)
            position = end
    except _Unreadable:
        return data
    if not changed:
        return data
    # Each member starts 4-byte aligned in the output too (cpio members must).
    return b"".join(bytes(p) + b"\0" * (-len(p) % 4) for p in pieces)


def _align4(value: int) -> int:
    return (value + 3) & ~3


def _cpio_end(view: memoryview, start: int) -> int:
    """The end of the newc archive at ``start``: just past its TRAILER!!! entry."""
    position = start
    while True:
        header = bytes(view[position:position + CPIO_HEADER])
        if len(header) < CPIO_HEADER or header[:6] not in CPIO_MAGICS:
            raise _Unreadable("not a cpio header")
        try:
            file_size = int(header[54:62], 16)
            name_size = int(header[94:102], 16)
        except ValueError:
            raise _Unreadable("bad cpio header") from None
        name_end = position + CPIO_HEADER + name_size
        name = bytes(view[position + CPIO_HEADER:name_end]).rstrip(b"\0")
        position = _align4(_align4(name_end) + file_size) if file_size else _align4(name_end)
        if position > len(view):
            raise _Unreadable("cpio entry past the end")
        if name == TRAILER:
            return position     # 4-byte aligned, as the next member must be


def _decompress(view: memoryview, start: int, room: int) -> tuple[bytes, int]:
    """One compressed member: its output (at most ``room`` bytes) and where it ends."""
    magic = bytes(view[start:start + 6])
    if magic.startswith(GZIP_MAGIC):
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif magic.startswith(XZ_MAGIC):
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    else:
        try:
            import zstandard
        except ImportError:
            raise _Unreadable("no zstandard module") from None
        decoder = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    out, size, position = [], 0, start
    try:
        while position < len(view) and not _finished(decoder):
            chunk = view[position:position + STEP]
            piece = decoder.decompress(chunk)
            size += len(piece)
            if size > room:
                raise _Unreadable("over the limit")
            out.append(piece)
            position += len(chunk)
    except (zlib.error, lzma.LZMAError) as error:
        raise _Unreadable(str(error)) from None
    except Exception as error:      # zstandard.ZstdError derives from Exception only
        if type(error).__name__ != "ZstdError":
            raise
        raise _Unreadable(str(error)) from None
    if not _finished(decoder):
        raise _Unreadable("the stream does not end")
    return b"".join(out), position - len(decoder.unused_data)


def _finished(decoder) -> bool:
    return bool(getattr(decoder, "eof", False))
