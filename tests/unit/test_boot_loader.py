"""The Linux boot-protocol loader (pykvm/boot), without KVM.

Synthetic images are built here with struct from the boot.rst and ELF
layouts; offsets in the assertions are written out as boot.rst and
zero-page.rst give them, so a wrong constant in pykvm shows up.
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import sys

import pytest

from pykvm.boot import bzimage as bz
from pykvm.boot.bzimage import BzImage, read_image_file
from pykvm.boot.e820 import E820Entry, E820Type, e820_map
from pykvm.boot.elf import load_elf
from pykvm.boot.linux import load_linux, place_initrd
from pykvm.boot.payload import cached_path, decompress_payload, detect_compression, extract_vmlinux
from pykvm.boot.zeropage import ZeroPage, set_acpi_rsdp
from pykvm.errors import ConfigError, ImageError
from pykvm.layout import CMDLINE_ADDR, CMDLINE_MAX, GiB, MiB, ZERO_PAGE_ADDR
from pykvm.memory import GuestMemory

KERNEL_VIRT = 0xFFFFFFFF81000000
KERNEL_PHYS = 0x1000000


# --- builders -----------------------------------------------------------------------------
def make_elf(segments, entry, *, machine=62, elf_class=2, e_type=2) -> bytes:
    """An ELF64 executable; ``segments`` are (vaddr, paddr, file bytes, memsz)."""
    ehdr_size, phdr_size = 64, 56
    offset = ehdr_size + phdr_size * len(segments)
    phdrs, contents = b"", b""
    for vaddr, paddr, content, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, offset + len(contents), vaddr, paddr,
                             len(content), memsz, 0x1000)
        contents += content
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, ehdr_size, 0, 0,
                               ehdr_size, phdr_size, len(segments), 64, 0, 0)
    return ehdr + phdrs + contents


TEXT = bytes(range(256)) * 16          # 4 KiB of recognisable "code"
DATA = b"data" * 256                   # 1 KiB, then 3 KiB of bss


def linux_like_elf() -> bytes:
    """Two segments linked high and loaded at 16 MiB; entry physical, as Linux's ENTRY(phys_startup_64)."""
    return make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, len(TEXT)),
                     (KERNEL_VIRT + 0x200000, KERNEL_PHYS + 0x200000, DATA, 0x1000)], entry=KERNEL_PHYS)


KERNEL_END = KERNEL_PHYS + 0x200000 + 0x1000
VERSION_STRING = b"6.1.0-test-amd64 (builder@example) #1 SMP PREEMPT_DYNAMIC"
DECOMPRESSOR = b"\x90" * 0x400  # stands in for the decompressor code before the payload


def make_bzimage(payload: bytes = b"", *, version=0x020F, xloadflags=bz.XLF_KERNEL_64, setup_sects=4,
                 boot_flag=0xAA55, magic=b"HdrS", cmdline_size=2047, initrd_addr_max=0x7FFFFFFF,
                 pref_address=KERNEL_PHYS, kernel_alignment=0x200000, init_size=0x400000,
                 header_length=0x6A) -> bytes:
    """A bzImage whose protected-mode code is DECOMPRESSOR followed by ``payload``."""
    setup = bytearray((setup_sects or 4) * 512 + 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = bytes([0xEB, header_length])
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x20E, 0x600)          # kernel_version: string at file offset 0x800
    setup[0x800:0x800 + len(VERSION_STRING) + 1] = VERSION_STRING + b"\0"
    setup[0x211] = bz.LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = 1                                      # relocatable_kernel
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, len(DECOMPRESSOR), len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + DECOMPRESSOR + payload


def size_append(data: bytes, compressed: bytes) -> bytes:
    """What Linux's Makefiles append after the compressed kernel: its size, u32 little-endian."""
    return compressed + struct.pack("<I", len(data))


def lz4_legacy(data: bytes) -> bytes:
    """The legacy LZ4 frame (`lz4 -l`): magic, then [u32 size][block] per 8 MiB of input."""
    import lz4.block

    out = bytearray(b"\x02\x21\x4c\x18")
    for start in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[start:start + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return bytes(out)


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "xz":  # as Linux's xz_wrap.sh: BCJ x86 filter, LZMA2, CRC32
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                             filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}])
    if kind == "zstd":  # streamed, so the frame does not record its content size (as `zstd` in a pipe)
        import zstandard

        compressor = zstandard.ZstdCompressor(level=19).compressobj()
        return compressor.compress(data) + compressor.flush()
    if kind == "lz4":
        return lz4_legacy(data)
    raise AssertionError(kind)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("PYKVM_CACHE", str(directory))
    return directory / "vmlinux"


@pytest.fixture
def memory():
    with GuestMemory.anonymous(64 * MiB) as guest_ram:
        yield guest_ram


def write(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


# --- setup header validation --------------------------------------------------------------
def test_good_bzimage_header_fields(tmp_path):
    image = BzImage.from_file(write(tmp_path, "vmlinuz", make_bzimage(b"PAYLOAD", setup_sects=0)))
    header = image.header
    assert header.setup_sects == 4  # 0 means 4
    assert header.version == 0x020F and header.version_text == "2.15"
    assert header.cmdline_size == 2047 and header.initrd_addr_max == 0x7FFFFFFF
    assert header.pref_address == KERNEL_PHYS and header.init_size == 0x400000
    assert header.raw == make_bzimage(b"PAYLOAD", setup_sects=0)[0x1F1:0x202 + 0x6A]
    assert bytes(image.protected_mode[:len(DECOMPRESSOR)]) == DECOMPRESSOR
    assert bytes(image.payload) == b"PAYLOAD"
    assert image.version_string == VERSION_STRING.decode()
    assert image.release == "6.1.0-test-amd64"


@pytest.mark.parametrize("image, message", [
    (make_bzimage(b"P", magic=b"HdrX"), "not a bzImage (no HdrS magic)"),
    (make_bzimage(b"P", boot_flag=0x1234), "boot flag is 0x1234"),
    (make_bzimage(b"P", version=0x020A), "boot protocol 2.10 is too old"),
    (make_bzimage(b"P", xloadflags=0x2), "has no 64-bit entry point (xloadflags"),
    (make_bzimage(b"PAYLOAD")[:-3], "truncated bzImage"),
    (make_bzimage(b"")[:5 * 512], "truncated bzImage (no protected-mode code"),
    (make_bzimage(b"P")[:0x220], "truncated bzImage"),
    (make_bzimage(b"P", header_length=0x10), "setup header length"),
    (b"\x90" * 0x100, "too short for a setup header"),
])
def test_bad_bzimage_is_rejected_with_the_reason(tmp_path, image, message):
    path = write(tmp_path, "vmlinuz-x", image)
    with pytest.raises(ImageError) as error:
        BzImage.from_file(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_unreadable_files_are_image_errors(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match=r"vmlinuz-missing: kernel image not found"):
        read_image_file(tmp_path / "vmlinuz-missing")
    with pytest.raises(ImageError, match="is a directory"):
        read_image_file(tmp_path)
    with pytest.raises(ImageError, match="empty: kernel image is empty"):
        read_image_file(write(tmp_path, "empty", b""))

    def forbidden(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    import pykvm.images
    monkeypatch.setattr(pykvm.images, "open", forbidden, raising=False)
    with pytest.raises(ImageError, match=r"secret: initrd image is not readable \(permission denied\)"):
        read_image_file(write(tmp_path, "secret", b"x"), "initrd")


# --- e820 ----------------------------------------------------------------------------------
LOW = [E820Entry(0, 0x9FC00, E820Type.RAM), E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820Type.RESERVED)]


@pytest.mark.parametrize("mem_size, rest", [
    (64 * MiB, [E820Entry(0x100000, 63 * MiB, E820Type.RAM)]),
    (128 * MiB, [E820Entry(0x100000, 127 * MiB, E820Type.RAM)]),
    (3 * GiB, [E820Entry(0x100000, 3 * GiB - MiB, E820Type.RAM)]),
    (8 * GiB, [E820Entry(0x100000, 3 * GiB - MiB, E820Type.RAM), E820Entry(4 * GiB, 5 * GiB, E820Type.RAM)]),
])
def test_e820_map(mem_size, rest):
    entries = e820_map(mem_size)
    assert entries == LOW + rest
    ram = sum(entry.size for entry in entries if entry.type == E820Type.RAM)
    assert ram == mem_size - (0x100000 - 0x9FC00)  # all of it but the reserved low area


def test_e820_needs_more_than_one_mib():
    with pytest.raises(ConfigError, match="too small for an e820 map"):
        e820_map(1 * MiB)


# --- zero page -----------------------------------------------------------------------------
def test_zero_page_for_a_bare_vmlinux_has_a_synthetic_header():
    page = ZeroPage()
    page.set_cmdline(0x20000)
    page.set_initrd(0x3000000, 12345)
    page.set_e820(e820_map(64 * MiB))
    data = bytes(page)
    assert len(data) == 4096
    assert struct.unpack_from("<H", data, 0x1FE)[0] == 0xAA55          # boot_flag
    assert data[0x202:0x206] == b"HdrS"                                 # header
    assert struct.unpack_from("<H", data, 0x206)[0] == 0x020F           # version
    assert data[0x210] == 0xFF                                          # type_of_loader
    assert data[0x211] == 0x81                                          # loadflags: LOADED_HIGH|CAN_USE_HEAP
    assert struct.unpack_from("<H", data, 0x1FA)[0] == 0xFFFF           # vid_mode
    assert struct.unpack_from("<H", data, 0x224)[0] == 0xE000 - 0x200   # heap_end_ptr
    assert struct.unpack_from("<I", data, 0x230)[0] == 0x200000         # kernel_alignment
    assert struct.unpack_from("<I", data, 0x228)[0] == 0x20000          # cmd_line_ptr
    assert struct.unpack_from("<II", data, 0x218) == (0x3000000, 12345)  # ramdisk_image, ramdisk_size
    assert struct.unpack_from("<III", data, 0xC0) == (0, 0, 0)          # their ext_ halves, ext_cmd_line_ptr
    assert data[0x1E8] == 3                                             # e820_entries
    assert struct.unpack_from("<QQI", data, 0x2D0 + 20 * 2) == (0x100000, 63 * MiB, 1)
    assert struct.unpack_from("<QQI", data, 0x2D0 + 20 * 1) == (0x9FC00, 0x100000 - 0x9FC00, 2)
    assert data[0x2D0 + 20 * 3:0x2D0 + 20 * 128] == bytes(20 * 125)


def test_zero_page_64_bit_fields_split_into_ext_halves():
    page = ZeroPage()
    page.set_cmdline(0x1_0002_0000)
    page.set_initrd(0x2_0000_3000, 0x1_0000_0005)
    page.set_acpi_rsdp(0xE0000)
    data = bytes(page)
    assert struct.unpack_from("<I", data, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", data, 0xC8)[0] == 1
    assert struct.unpack_from("<II", data, 0x218) == (0x3000, 5)
    assert struct.unpack_from("<II", data, 0xC0) == (2, 1)
    assert struct.unpack_from("<Q", data, 0x70)[0] == 0xE0000           # acpi_rsdp_addr


def test_zero_page_keeps_a_bzimage_header_and_sets_loader_fields():
    image = BzImage(make_bzimage(b"P"), "vmlinuz")
    data = bytes(ZeroPage(image.header.raw))
    header_end = 0x202 + 0x6A
    expected = bytearray(make_bzimage(b"P")[:header_end])
    expected[0x1FA:0x1FC] = b"\xff\xff"                    # vid_mode
    expected[0x210] = 0xFF                                 # type_of_loader
    expected[0x211] |= 0x80                                # CAN_USE_HEAP
    expected[0x224:0x226] = struct.pack("<H", 0xDE00)      # heap_end_ptr
    assert data[0x1F1:header_end] == expected[0x1F1:]
    assert data[:0x1F1] == bytes(0x1F1)                    # the boot sector is not copied: sentinel stays 0


def test_zero_page_holds_at_most_128_e820_entries():
    with pytest.raises(ConfigError, match="129 entries"):
        ZeroPage().set_e820([E820Entry(i * 4096, 4096, E820Type.RAM) for i in range(129)])


def test_acpi_rsdp_can_be_set_after_loading(memory):
    memory.write(ZERO_PAGE_ADDR, bytes(ZeroPage()))
    set_acpi_rsdp(memory, ZERO_PAGE_ADDR, 0xE0000)
    assert memory.read_u64(ZERO_PAGE_ADDR + 0x70) == 0xE0000


# --- ELF -------------------------------------------------------------------------------------
def test_elf_segments_go_to_their_physical_addresses(memory):
    memory.fill(KERNEL_PHYS, 0x201000, 0xAA)  # so that the bss zero-fill is visible
    loaded = load_elf(memory, linux_like_elf())
    assert loaded.entry == KERNEL_PHYS and loaded.start == KERNEL_PHYS and loaded.end == KERNEL_END
    assert memory.read(KERNEL_PHYS, len(TEXT)) == TEXT
    assert memory.read(KERNEL_PHYS + 0x200000, len(DATA)) == DATA
    assert memory.read(KERNEL_PHYS + 0x200000 + len(DATA), 0x1000 - len(DATA)) == bytes(0x1000 - len(DATA))


def test_elf_virtual_entry_is_translated_to_physical(memory):
    elf = make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, len(TEXT))], entry=KERNEL_VIRT + 0x40)
    assert load_elf(memory, elf).entry == KERNEL_PHYS + 0x40


@pytest.mark.parametrize("elf, message", [
    (make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, 4096)], KERNEL_PHYS, machine=3), "not for x86-64"),
    (make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, 4096)], KERNEL_PHYS, elf_class=1), "not a 64-bit ELF"),
    (make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, 4096)], KERNEL_PHYS, e_type=3), "not an executable"),
    (make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, 4096)], 0x1234), "entry point 0x1234 lies outside"),
    (make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, 16)], KERNEL_PHYS), "more file bytes than memory bytes"),
    (make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, 4096)], KERNEL_PHYS)[:-1], "segment 0 runs past the end"),
    (make_elf([(KERNEL_VIRT, KERNEL_PHYS, TEXT, 4096)], KERNEL_PHYS)[:100], "program headers run past"),
    (make_elf([], KERNEL_PHYS), "no loadable (PT_LOAD) segment"),
    (make_elf([(0x8000, 0x8000, TEXT, 4096)], 0x8000), "overwrite the boot area"),
    (make_elf([(KERNEL_VIRT, 63 * MiB, TEXT, 2 * MiB)], 63 * MiB), "kernel does not fit in 64 MiB of guest"),
    (b"\x7fELF\x02\x01", "truncated ELF header"),
])
def test_bad_elf_is_rejected(memory, elf, message):
    with pytest.raises(ImageError, match="vmlinux: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_elf(memory, elf)


# --- payload extraction --------------------------------------------------------------------
VMLINUX = linux_like_elf()


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd", "lz4"])
def test_payload_round_trips_with_trailing_size(kind):
    payload = size_append(VMLINUX, compress(kind, VMLINUX))
    assert detect_compression(payload) == kind
    assert decompress_payload(payload) == VMLINUX


@pytest.mark.parametrize("kind, command", [
    ("gzip", ["gzip", "-n", "-9"]),
    ("xz", ["xz", "--format=xz", "--check=crc32", "--x86", "--lzma2=dict=1MiB"]),
    ("zstd", ["zstd", "-22", "--ultra", "-q"]),
    ("lz4", ["lz4", "-l", "-9", "-q"]),
])
def test_payload_from_the_compressors_linux_uses(kind, command):
    """Cross-check against the real tools' output, framed as Linux's Makefiles frame it."""
    if shutil.which(command[0]) is None:
        pytest.skip(f"{command[0]} is not installed")
    compressed = subprocess.run(command, input=VMLINUX, stdout=subprocess.PIPE, check=True).stdout
    assert decompress_payload(size_append(VMLINUX, compressed)) == VMLINUX


def test_lz4_legacy_payload_of_several_chunks():
    text = os.urandom(4096) * (2560 + 7)  # 10 MiB + 7 pages: two chunks, the second one partial
    big = make_elf([(KERNEL_VIRT, KERNEL_PHYS, text, len(text))], KERNEL_PHYS)
    assert len(big) > 8 * MiB  # so the frame has two chunks
    payload = size_append(big, lz4_legacy(big))
    assert decompress_payload(payload) == big


def test_lz4_legacy_concatenated_frames():
    first, second = VMLINUX[:1000], VMLINUX[1000:]
    assert decompress_payload(size_append(VMLINUX, lz4_legacy(first) + lz4_legacy(second))) == VMLINUX


@pytest.mark.parametrize("payload, message", [
    (b"BZh91AY&SY", "unsupported compression bzip2"),
    (b"\x5d\x00\x00\x80\x00", "unsupported compression lzma"),
    (b"\x89LZO\x00\r\n", "unsupported compression lzo"),
    (b"\x00\x11\x22\x33", "unknown compression (magic 00112233)"),
    (compress("xz", VMLINUX)[:-30], "xz kernel payload is truncated"),
    (compress("gzip", VMLINUX)[:-30], "gzip kernel payload is truncated"),
    (compress("zstd", VMLINUX)[:-10], "zstd kernel payload is truncated"),
    (compress("zstd", VMLINUX)[:4] + b"\xff" * 50, "zstd kernel payload is corrupt"),  # reserved bit set
    (compress("gzip", VMLINUX)[:-8] + b"\0" * 8, "gzip kernel payload is corrupt"),       # wrong CRC32
    (b"\x02\x21\x4c\x18" + struct.pack("<I", 8) + b"\xff" * 8, "lz4 kernel payload is corrupt"),
    (b"\x02\x21\x4c\x18" + struct.pack("<I", 1000), "lz4 kernel payload holds no complete chunk"),
    (compress("gzip", b"not an ELF at all"), "decompressed gzip payload is not an ELF vmlinux"),
])
def test_bad_payload_is_rejected(payload, message):
    with pytest.raises(ImageError, match="vmlinuz: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        decompress_payload(payload, "vmlinuz")


def test_missing_optional_decompressor_says_what_to_install(monkeypatch):
    payload = compress("zstd", VMLINUX)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    with pytest.raises(ImageError, match="install the zstandard package"):
        decompress_payload(payload)


def test_extracted_vmlinux_is_cached_by_the_image_hash(cache):
    image = BzImage(make_bzimage(size_append(VMLINUX, compress("gzip", VMLINUX))), "vmlinuz")
    path = cached_path(image)
    assert path.parent == cache and path.suffix == ".elf" and len(path.stem) == 64
    assert extract_vmlinux(image) == VMLINUX
    assert path.read_bytes() == VMLINUX
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    # The next extraction reads the cache: prove it by planting a different ELF there.
    planted = make_elf([(KERNEL_VIRT, KERNEL_PHYS, b"cached", 4096)], KERNEL_PHYS)
    path.write_bytes(planted)
    assert extract_vmlinux(image) == planted
    # A damaged cache entry is replaced, not trusted.
    path.write_bytes(b"garbage")
    assert extract_vmlinux(image) == VMLINUX and path.read_bytes() == VMLINUX


def test_unwritable_cache_still_extracts(tmp_path, monkeypatch):
    blocker = write(tmp_path, "not-a-directory", b"")
    monkeypatch.setenv("PYKVM_CACHE", str(blocker))
    image = BzImage(make_bzimage(size_append(VMLINUX, compress("xz", VMLINUX))), "vmlinuz")
    assert extract_vmlinux(image) == VMLINUX


# --- load_linux ------------------------------------------------------------------------------
def test_load_vmlinux(tmp_path, memory):
    boot = load_linux(memory, write(tmp_path, "vmlinux", VMLINUX), cmdline="console=ttyS0 quiet")
    assert (boot.kind, boot.entry, boot.kernel_end) == ("vmlinux", KERNEL_PHYS, KERNEL_END)
    assert boot.release is None
    assert boot.boot_params_addr == ZERO_PAGE_ADDR == 0x7000
    assert (boot.initrd_addr, boot.initrd_size) == (0, 0)
    assert memory.read(CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    zero_page = ZERO_PAGE_ADDR
    assert memory.read_u32(zero_page + 0x228) == CMDLINE_ADDR
    assert memory.read(zero_page + 0x202, 4) == b"HdrS"
    assert memory.read_u8(zero_page + 0x1E8) == 3
    assert memory.read_u32(zero_page + 0x218) == 0 and memory.read_u32(zero_page + 0x21C) == 0


def test_load_bzimage_extracts_the_vmlinux(tmp_path, memory, cache):
    image = make_bzimage(size_append(VMLINUX, compress("lz4", VMLINUX)), initrd_addr_max=0x37FFFFFF)
    boot = load_linux(memory, write(tmp_path, "vmlinuz", image), initrd=b"I" * 5000)
    assert (boot.kind, boot.entry, boot.kernel_end) == ("bzimage-extracted", KERNEL_PHYS, KERNEL_END)
    assert boot.release == "6.1.0-test-amd64"
    assert memory.read(KERNEL_PHYS, len(TEXT)) == TEXT
    # The image's own setup header reached the zero page.
    assert memory.read_u16(ZERO_PAGE_ADDR + 0x20E) == 0x600                 # kernel_version
    assert memory.read_u32(ZERO_PAGE_ADDR + 0x22C) == 0x37FFFFFF            # initrd_addr_max
    assert memory.read_u32(ZERO_PAGE_ADDR + 0x260) == 0x400000              # init_size
    assert memory.read_u8(ZERO_PAGE_ADDR + 0x210) == 0xFF
    assert memory.read_u32(ZERO_PAGE_ADDR + 0x228) == CMDLINE_ADDR
    assert memory.read(CMDLINE_ADDR, 1) == b"\0"                            # empty command line
    # The initrd sits at the top of RAM, page aligned.
    assert boot.initrd_size == 5000 and boot.initrd_addr == (64 * MiB - 5000) // 4096 * 4096
    assert memory.read(boot.initrd_addr, 5000) == b"I" * 5000
    assert memory.read_u32(ZERO_PAGE_ADDR + 0x218) == boot.initrd_addr
    assert memory.read_u32(ZERO_PAGE_ADDR + 0x21C) == 5000
    assert list(cache.iterdir())  # extracted once, cached for the next boot


def test_load_bzimage_without_extraction_runs_its_decompressor(tmp_path, memory):
    payload = size_append(VMLINUX, compress("gzip", VMLINUX))
    image = make_bzimage(payload, pref_address=0x1100000, kernel_alignment=0x200000, init_size=0x800000)
    boot = load_linux(memory, write(tmp_path, "vmlinuz", image), extract=False)
    load = 0x1200000  # pref_address rounded up to kernel_alignment
    assert (boot.kind, boot.entry, boot.kernel_end) == ("bzimage", load + 0x200, load + 0x800000)
    assert memory.read(load, len(DECOMPRESSOR) + len(payload)) == DECOMPRESSOR + payload
    assert memory.read_u32(ZERO_PAGE_ADDR + 0x214) == load                  # code32_start


def test_load_bzimage_without_extraction_needs_init_size(tmp_path, memory):
    image = make_bzimage(b"P", init_size=60 * MiB)
    with pytest.raises(ImageError, match="vmlinuz: kernel does not fit in 64 MiB of guest RAM"):
        load_linux(memory, write(tmp_path, "vmlinuz", image), extract=False)


def test_load_rejects_what_is_not_a_kernel(tmp_path, memory):
    path = write(tmp_path, "notes.txt", b"hello, this is not a kernel" * 100)
    with pytest.raises(ImageError, match="notes.txt: not a Linux kernel image"):
        load_linux(memory, path)


def test_kernel_too_big_for_guest_ram(tmp_path):
    with GuestMemory.anonymous(16 * MiB) as small:
        with pytest.raises(ImageError, match="kernel does not fit in 16 MiB of guest RAM"):
            load_linux(small, write(tmp_path, "vmlinux", VMLINUX))


def test_command_line_limits(tmp_path, memory, cache):
    vmlinux = write(tmp_path, "vmlinux", VMLINUX)
    load_linux(memory, vmlinux, cmdline="x" * (CMDLINE_MAX - 1))
    assert memory.read_u8(CMDLINE_ADDR + CMDLINE_MAX - 1) == 0
    too_long = f"{CMDLINE_MAX} bytes; this kernel accepts at most {CMDLINE_MAX - 1}"
    with pytest.raises(ConfigError, match=too_long):
        load_linux(memory, vmlinux, cmdline="x" * CMDLINE_MAX)
    with pytest.raises(ConfigError, match="NUL"):
        load_linux(memory, vmlinux, cmdline="a\0b")
    bzimage = write(tmp_path, "vmlinuz", make_bzimage(size_append(VMLINUX, compress("gzip", VMLINUX)),
                                                      cmdline_size=16))
    load_linux(memory, bzimage, cmdline="x" * 16)
    with pytest.raises(ConfigError, match="17 bytes; this kernel accepts at most 16"):
        load_linux(memory, bzimage, cmdline="x" * 17)


def test_initrd_from_a_path(tmp_path, memory):
    initrd = write(tmp_path, "initrd.cpio", b"070701" + bytes(4090))
    boot = load_linux(memory, write(tmp_path, "vmlinux", VMLINUX), initrd=initrd)
    assert boot.initrd_addr == 64 * MiB - 4096 and boot.initrd_size == 4096
    assert memory.read(boot.initrd_addr, 6) == b"070701"
    with pytest.raises(ImageError, match="initrd image not found"):
        load_linux(memory, tmp_path / "vmlinux", initrd=tmp_path / "missing.cpio")
    with pytest.raises(ImageError, match="initrd is empty"):
        load_linux(memory, tmp_path / "vmlinux", initrd=b"")


def test_initrd_that_does_not_fit(tmp_path, memory):
    with pytest.raises(ImageError, match=r"initrd of 47\.0 MiB does not fit in guest RAM"):
        load_linux(memory, write(tmp_path, "vmlinux", VMLINUX), initrd=bytes(47 * MiB))
    # The largest initrd that fits ends at the top of RAM and starts right after the kernel.
    largest = 64 * MiB - KERNEL_END
    assert place_initrd(memory, largest, KERNEL_END, 0x7FFFFFFF) == KERNEL_END


def test_initrd_respects_initrd_addr_max(memory):
    assert place_initrd(memory, 8192, KERNEL_END, 0x02FFFFFF) == 0x3000000 - 8192
    with pytest.raises(ImageError, match="does not fit"):
        place_initrd(memory, 8192, KERNEL_END, KERNEL_END + 4096)


def test_eight_gib_guest(tmp_path):
    with GuestMemory.anonymous(8 * GiB) as big:
        boot = load_linux(big, write(tmp_path, "vmlinux", VMLINUX), initrd=b"R" * 4096)
        # Below initrd_addr_max (2 GiB - 1 for a bare vmlinux), not in the RAM above 4 GiB.
        assert boot.initrd_addr == 2 * GiB - 4096
        assert big.read_u8(ZERO_PAGE_ADDR + 0x1E8) == 4
        high = struct.unpack("<QQI", big.read(ZERO_PAGE_ADDR + 0x2D0 + 3 * 20, 20))
        assert high == (4 * GiB, 5 * GiB, 1)
        low = struct.unpack("<QQI", big.read(ZERO_PAGE_ADDR + 0x2D0 + 2 * 20, 20))
        assert low == (MiB, 3 * GiB - MiB, 1)


def test_initrd_never_crosses_into_the_pci_hole(tmp_path):
    with GuestMemory.anonymous(4 * GiB) as guest_ram:
        assert place_initrd(guest_ram, 4096, KERNEL_END, 0xFFFFFFFF) == 3 * GiB - 4096


# --- a real kernel, when one is at hand ---------------------------------------------------------
REAL_KERNEL = os.environ.get("PYKVM_TEST_BZIMAGE")


@pytest.mark.skipif(not REAL_KERNEL, reason="set PYKVM_TEST_BZIMAGE to a distribution bzImage")
def test_real_bzimage(tmp_path, cache):
    with GuestMemory.anonymous(256 * MiB) as guest_ram:
        boot = load_linux(guest_ram, REAL_KERNEL, initrd=b"\0" * 4096, cmdline="console=ttyS0")
        assert boot.kind == "bzimage-extracted" and boot.entry == KERNEL_PHYS
        assert boot.release and boot.release[0].isdigit()
        assert boot.kernel_end < boot.initrd_addr < 256 * MiB
