"""Copying between byte strings and a descriptor chain's buffers (views of guest RAM):
scatter, gather, sub-views, and streaming a chain's readable bytes in bounded pieces.

The guest is hostile here too: a chain may name all of guest RAM many times over,
so nothing gathers a whole chain; :func:`gather` takes a limit and
:func:`stream_readable` copies through one buffer of at most STREAM_CHUNK bytes and at
most ``limit`` bytes of a chain (the rest is dropped and counted).
"""

from __future__ import annotations

from dataclasses import dataclass


def gather(views: list[memoryview], limit: int) -> bytes:
    """The first ``limit`` bytes of ``views`` in order: one copy, for small headers
    (a limit is required: a chain's total may be many times guest RAM)."""
    out = bytearray()
    for view in views:
        if len(out) >= limit:
            break
        out += view[:limit - len(out)]
    return bytes(out)


# What a device may copy out of one request at most, and the piece it copies at a time:
# a chain may name all of guest RAM many times over (64 descriptors of 512 MiB each), so
# a device streams what it reads, never gathers it. The per-request bound is pykvm's, not
# the spec's: no driver puts that much in one console request (Linux writes at most
# 32 KiB per buffer, a pipe's worth per splice); beyond it bytes are dropped and counted.
STREAM_CHUNK = 64 * 1024
MAX_STREAM_PER_CHAIN = 1 << 20


@dataclass
class StreamCount:
    """What :func:`stream_readable` passed on and what it dropped (beyond the bound)."""

    sent: int = 0
    dropped: int = 0


def stream_readable(queue, write, limit: int = MAX_STREAM_PER_CHAIN) -> StreamCount:
    """Pop every available chain of ``queue`` (a Virtqueue) and pass its device-readable
    bytes to ``write(bytes)`` in order, at most ``limit`` bytes of each chain (the rest
    is counted as dropped),
    through one buffer of at most STREAM_CHUNK bytes: the host memory this takes does
    not depend on what the guest wrote. Each chain is returned with length 0."""
    count = StreamCount()
    buffer = bytearray()
    while (chain := queue.pop()) is not None:
        room = limit
        for view in chain.readable:
            take = min(len(view), room)
            room -= take
            count.dropped += len(view) - take
            offset = 0
            while offset < take:
                piece = min(take - offset, STREAM_CHUNK - len(buffer))
                buffer += view[offset:offset + piece]
                offset += piece
                if len(buffer) >= STREAM_CHUNK:
                    count.sent += len(buffer)
                    write(bytes(buffer))
                    buffer.clear()
        queue.add_used(chain.head, 0)
    if buffer:
        count.sent += len(buffer)
        write(bytes(buffer))
    return count


def scatter(views: list[memoryview], data: bytes | memoryview) -> int:
    """Copy ``data`` into ``views`` in order; returns the number of bytes written."""
    data = memoryview(data)
    done = 0
    for view in views:
        if done >= len(data):
            break
        count = min(len(view), len(data) - done)
        view[:count] = data[done:done + count]
        done += count
    return done


def slice_views(views: list[memoryview], start: int, length: int | None = None) -> list[memoryview]:
    """The sub-views covering bytes [start, start+length) of the concatenation (no copy)."""
    out = []
    position = 0
    end = None if length is None else start + length
    for view in views:
        view_start, view_end = position, position + len(view)
        position = view_end
        lo = max(start, view_start)
        hi = view_end if end is None else min(end, view_end)
        if lo < hi:
            out.append(view[lo - view_start:hi - view_start])
    return out
