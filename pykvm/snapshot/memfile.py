"""Guest RAM in ``memory.bin``: a sparse file, one region after another.

Only pages that are not all zero are written (at their own offsets), so a guest
that touched 40 MiB of its 512 MiB costs about 40 MiB of disk; the rest are holes
that read back as zeros. Pages are found in 64 KiB chunks (a copy and a compare,
both in C: about 0.3 ms per MiB), then 4 KiB pages within the chunks that are not
all zero.

The digest (``memory.sha256`` in state.json) is defined by the content alone, not
by how the file system stores holes: sha256 over every maximal run of non-zero
pages, each as ``offset (u64 LE) || length (u64 LE) || bytes``. Verifying it reads
only the file's data extents (SEEK_DATA/SEEK_HOLE), so a restore does not read
the holes either.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import struct

PAGE = 4096
CHUNK = 64 * 1024
_ZERO_CHUNK = bytes(CHUNK)
_ZERO_PAGE = bytes(PAGE)
_RUN_HEADER = struct.Struct("<QQ")


def nonzero_runs(buffer, start: int = 0, end: int | None = None):
    """(offset, length) of each maximal run of non-zero 4 KiB pages in ``buffer[start:end]``;
    ``start`` and ``end`` page-aligned. ``buffer`` slices to bytes (mmap) or memoryview."""
    end = len(buffer) if end is None else end
    run_start = None
    offset = start
    while offset < end:
        chunk_end = min(offset + CHUNK, end)
        if chunk_end - offset == CHUNK and bytes(buffer[offset:chunk_end]) == _ZERO_CHUNK:
            if run_start is not None:
                yield run_start, offset - run_start
                run_start = None
            offset = chunk_end
            continue
        for page in range(offset, chunk_end, PAGE):
            if bytes(buffer[page:page + PAGE]) == _ZERO_PAGE:
                if run_start is not None:
                    yield run_start, page - run_start
                    run_start = None
            elif run_start is None:
                run_start = page
        offset = chunk_end
    if run_start is not None:
        yield run_start, end - run_start


def write_memory(memory, fd: int) -> dict:
    """Write ``memory`` (a GuestMemory) into ``fd``, a new empty file (the caller creates
    it safely: pykvm/snapshot/directory.py), as a sparse file; returns the ``memory``
    section of state.json but its ``file`` (layout, size, digest, pages written)."""
    digest = hashlib.sha256()
    regions, file_offset, data_bytes = [], 0, 0
    total = sum(region.size for region in memory.regions)
    os.ftruncate(fd, total)
    for region in memory.regions:
        view = region.view
        for offset, length in nonzero_runs(view, 0, region.size):
            data = view[offset:offset + length]
            digest.update(_RUN_HEADER.pack(file_offset + offset, length))
            digest.update(data)
            written = 0
            while written < length:
                written += os.pwrite(fd, data[written:], file_offset + offset + written)
            data_bytes += length
        regions.append({"guest_addr": region.guest_addr, "size": region.size,
                        "file_offset": file_offset})
        file_offset += region.size
    os.fsync(fd)
    return {"size": file_offset, "regions": regions, "data_bytes": data_bytes,
            "sha256": digest.hexdigest(), "disk_bytes": os.fstat(fd).st_blocks * 512}


def data_extents(fd: int, size: int):
    """(start, end) of each data extent of the file, page-aligned outward; the whole
    file as one extent where SEEK_DATA is not supported."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                return            # only a hole is left
            if error.errno == errno.EINVAL and position == 0:
                yield 0, size     # no SEEK_DATA here: read everything
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start, end = start - start % PAGE, min(-(-end // PAGE) * PAGE, size)
        yield start, end
        position = end


def memory_digest(path: str, regions: list[tuple[int, int]]) -> str:
    """The digest of ``memory.bin`` as :func:`write_memory` defines it; ``regions`` are
    the (file offset, size) of each RAM region, whose runs never join across regions."""
    digest = hashlib.sha256()
    size = sum(length for _, length in regions)
    if size == 0:
        return digest.hexdigest()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents = list(data_extents(fd, os.fstat(fd).st_size))
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mapping:
            with memoryview(mapping) as view:
                for region_start, length in regions:
                    region_end = region_start + length
                    pending = None        # a run may go on from one extent into the next
                    for start, end in extents:
                        start, end = max(start, region_start), min(end, region_end)
                        if start >= end:
                            continue
                        for offset, run in nonzero_runs(mapping, start, end):
                            if pending is not None and sum(pending) == offset:
                                pending = (pending[0], pending[1] + run)
                                continue
                            if pending is not None:
                                _digest_run(digest, view, *pending)
                            pending = (offset, run)
                    if pending is not None:
                        _digest_run(digest, view, *pending)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _digest_run(digest, view, offset: int, length: int) -> None:
    digest.update(_RUN_HEADER.pack(offset, length))
    digest.update(view[offset:offset + length])
