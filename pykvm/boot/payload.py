"""The ELF vmlinux inside a bzImage: find its compression, decompress it, cache it.

Why: on hosts where guest ring-0 code is emulated (kvm_pvm, see docs/hosts.md) the
kernel's own decompressor takes minutes; decompressing in pykvm and loading the
ELF takes a second, and the cache makes the next boot free.

Linux appends the uncompressed size (4 bytes) after the compressed stream
(``size_append`` in its Makefiles), so every decoder here stops at the end of
its stream and ignores what follows.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import struct
import tempfile
import zlib
from pathlib import Path

from ..errors import ImageError
from ..images import MAX_VMLINUX_SIZE, too_big_payload
from .bzimage import BzImage

ELF_MAGIC = b"\x7fELF"

# (magic, name) of the formats boot.rst lists for payload_offset; the first
# four pykvm decompresses, the others it names in its error.
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
UNSUPPORTED_MAGICS = {
    b"BZh": "bzip2",
    b"\x5d\x00": "lzma",
    b"\x89LZO": "lzo",
    b"\x1f\x9e": "old gzip",
}

# The legacy LZ4 frame (`lz4 -l`): chunks of [u32 compressed size][LZ4 block],
# each block decompressing to at most 8 MiB.
LZ4_LEGACY_CHUNK = 8 << 20
LZ4_LEGACY_MAX_BLOCK = LZ4_LEGACY_CHUNK + LZ4_LEGACY_CHUNK // 255 + 16  # LZ4_compressBound(8 MiB)

# Linux builds zstd payloads with `zstd -22 --ultra` (windows up to 128 MiB);
# allow the largest window zstd defines rather than the library's default.
ZSTD_MAX_WINDOW = 1 << 31
ZSTD_INPUT_STEP = 1024


def detect_compression(payload: bytes | memoryview, name: str = "kernel") -> str:
    """The payload's format by its magic: "gzip", "xz", "zstd", "lz4" or "elf" (not compressed)."""
    head = bytes(payload[:8])
    for magic, kind in ((ELF_MAGIC, "elf"), (GZIP_MAGIC, "gzip"), (XZ_MAGIC, "xz"),
                        (ZSTD_MAGIC, "zstd"), (LZ4_LEGACY_MAGIC, "lz4")):
        if head.startswith(magic):
            return kind
    for magic, kind in UNSUPPORTED_MAGICS.items():
        if head.startswith(magic):
            raise ImageError(f"{name}: unsupported compression {kind} for the kernel payload"
                             " (pykvm extracts gzip, xz, zstd and lz4; or boot it with extract=False)")
    raise ImageError(f"{name}: kernel payload has an unknown compression (magic {head[:6].hex()})")


def decompress_payload(payload: bytes | memoryview, name: str = "kernel") -> bytes:
    """The ELF vmlinux the payload holds."""
    kind = detect_compression(payload, name)
    decoder = _DECODERS[kind]
    try:
        vmlinux = decoder(payload, name)
    except (zlib.error, lzma.LZMAError, _CorruptStream) as error:
        raise ImageError(f"{name}: {kind} kernel payload is corrupt ({error})") from None
    if not vmlinux.startswith(ELF_MAGIC):
        raise ImageError(f"{name}: the decompressed {kind} payload is not an ELF vmlinux")
    return vmlinux


class _CorruptStream(Exception):
    """A PyPI decompressor's own error (they derive from Exception only), renamed for one except clause."""


def _not_compressed(payload, name) -> bytes:
    return bytes(payload)


def _gunzip(payload, name) -> bytes:
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip container, one member
    vmlinux = decoder.decompress(payload, MAX_VMLINUX_SIZE + 1)
    _require_bounded(vmlinux, "gzip", name)
    _require_end(decoder.eof, "gzip", name)
    return vmlinux


def _unxz(payload, name) -> bytes:
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    vmlinux = decoder.decompress(payload, MAX_VMLINUX_SIZE + 1)
    _require_bounded(vmlinux, "xz", name)
    _require_end(decoder.eof, "xz", name)
    return vmlinux


def _unzstd(payload, name) -> bytes:
    zstandard = _import_optional("zstandard", "zstd")
    decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
    data = memoryview(payload)
    pieces, size = [], 0
    try:
        # Fed in small steps so the output stays bounded: one step of input can only
        # expand by ~ZSTD_INPUT_STEP / 4 blocks of 128 KiB (RLE blocks are 4 bytes).
        for start in range(0, len(data), ZSTD_INPUT_STEP):
            if decoder.eof:
                break
            piece = decoder.decompress(data[start:start + ZSTD_INPUT_STEP])
            size += len(piece)
            if size > MAX_VMLINUX_SIZE:
                raise too_big_payload(name, "zstd")
            pieces.append(piece)
    except zstandard.ZstdError as error:
        raise _CorruptStream(error) from None
    _require_end(decoder.eof, "zstd", name)
    return b"".join(pieces)


def _unlz4_legacy(payload, name) -> bytes:
    lz4_block = _import_optional("lz4.block", "lz4")
    data = memoryview(payload)
    chunks = []
    position = len(LZ4_LEGACY_MAGIC)
    while position + 4 <= len(data):
        size, = struct.unpack_from("<I", data, position)
        if data[position:position + 4] == LZ4_LEGACY_MAGIC:
            position += 4  # a concatenated frame starts: its chunks continue the output
            continue
        if not 0 < size <= LZ4_LEGACY_MAX_BLOCK or position + 4 + size > len(data):
            break  # not a chunk: the size Linux appends, or other trailing bytes
        block = data[position + 4:position + 4 + size]
        if len(chunks) * LZ4_LEGACY_CHUNK >= MAX_VMLINUX_SIZE:
            raise too_big_payload(name, "lz4")
        try:
            chunks.append(lz4_block.decompress(block, uncompressed_size=LZ4_LEGACY_CHUNK))
        except lz4_block.LZ4BlockError as error:
            raise _CorruptStream(error) from None
        position += 4 + size
    if not chunks:
        raise ImageError(f"{name}: lz4 kernel payload holds no complete chunk")
    return b"".join(chunks)


_DECODERS = {"elf": _not_compressed, "gzip": _gunzip, "xz": _unxz, "zstd": _unzstd, "lz4": _unlz4_legacy}


def _require_bounded(vmlinux: bytes, kind: str, name: str) -> None:
    """Decoders stop one byte past MAX_VMLINUX_SIZE: more means a decompression bomb."""
    if len(vmlinux) > MAX_VMLINUX_SIZE:
        raise too_big_payload(name, kind)


def _require_end(reached_end: bool, kind: str, name: str) -> None:
    if not reached_end:
        raise ImageError(f"{name}: {kind} kernel payload is truncated (the stream does not end)")


def _import_optional(module: str, kind: str):
    """Import a decompressor that is a PyPI package only when a payload needs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ImageError(f"this kernel's payload is {kind}-compressed: install the {package} package"
                         f" (pip install {package})") from None


# --- the cache ----------------------------------------------------------------------
def cache_dir() -> Path:
    """Where extracted vmlinux files live: ${PYKVM_CACHE:-~/.cache/pykvm}/vmlinux."""
    root = os.environ.get("PYKVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pykvm")
    return Path(root) / "vmlinux"


def cached_path(image: BzImage, directory: Path | None = None) -> Path:
    """The cache file for this bzImage: named by the sha256 of the whole image."""
    digest = hashlib.sha256(image.data).hexdigest()
    return (directory or cache_dir()) / f"{digest}.elf"


def extract_vmlinux(image: BzImage, directory: Path | None = None) -> bytes:
    """The ELF vmlinux of ``image``, from the cache when it was extracted before."""
    path = cached_path(image, directory)
    try:
        vmlinux = path.read_bytes()
        if vmlinux.startswith(ELF_MAGIC):
            return vmlinux
    except OSError:
        pass  # not cached yet (or unreadable): extract it again
    if not image.header.payload_length:
        raise ImageError(f"{image.name}: bzImage has no payload to extract (payload_length is 0)")
    vmlinux = decompress_payload(image.payload, image.name)
    _store(path, vmlinux)
    return vmlinux


def _store(path: Path, content: bytes) -> None:
    """Write atomically, so a concurrent pykvm never reads half a file.

    A cache that cannot be written (read-only home, full disk) only costs the
    next boot another extraction, so it is not an error.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
