"""PUT /logger and PUT /metrics: where Firecracker's log lines and metrics go.

Firecracker writes both to a file or named pipe the client made beforehand; it never
creates one. pykvm does the same, and opens the path without following a symbolic
link (O_NOFOLLOW), non-blocking (a FIFO nobody reads does not stall the VMM; lines
that do not fit are dropped, as Firecracker drops them), append-only.

Log line (Firecracker's ``logger`` module): ``TIMESTAMP [ID:THREAD(:LEVEL)(:FILE:LINE)] MESSAGE``.
Metrics line: one JSON object per flush, ``{"utc_timestamp_ms": N, ...groups}``.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import stat
import sys
import threading
import time

from .resources import LEVELS, ApiFault

_RANK = {name: rank for rank, name in enumerate(LEVELS)}   # Off < Error < ... < Trace
MAX_LINE = 1 << 16


def open_sink(path: str, what: str) -> int:
    """An fd to append to ``path``: an existing regular file or FIFO, not a symlink."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW |
                     os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise ApiFault(f"{what}: {path}: no such file or named pipe (create it first)") from None
    except OSError as error:
        raise ApiFault(f"{what}: {path}: cannot open: {error.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        os.close(fd)
        raise ApiFault(f"{what}: {path}: not a regular file or named pipe")
    return fd


def _write_line(fd: int, line: str) -> None:
    data = line.encode(errors="replace")[:MAX_LINE - 1] + b"\n"
    try:
        os.write(fd, data)
    except (BlockingIOError, BrokenPipeError, OSError):
        pass            # a full or unread pipe: the line is dropped, the VMM goes on


class Log:
    """The VMM's log: stderr until PUT /logger (or --log-path) names a file."""

    def __init__(self, instance_id: str, level: str = "Info", *, show_level: bool = False,
                 show_origin: bool = False, stream=sys.stderr):
        self.instance_id = instance_id
        self.level = _level(level)
        self.show_level, self.show_origin = show_level, show_origin
        self.stream = stream
        self.fd: int | None = None
        self._lock = threading.Lock()

    def configure(self, path: str | None, level: str, show_level: bool, show_origin: bool) -> None:
        fd = open_sink(path, "logger") if path is not None else None
        with self._lock:
            if fd is not None:
                if self.fd is not None:
                    os.close(self.fd)
                self.fd = fd
            self.level = _level(level)
            self.show_level, self.show_origin = show_level, show_origin

    def log(self, level: str, message: str) -> None:
        if _RANK[level] > _RANK[self.level] or self.level == "Off":
            return
        now = datetime.datetime.now(datetime.timezone.utc)
        tags = [self.instance_id, threading.current_thread().name]
        if self.show_level:
            tags.append(level.upper())
        if self.show_origin:
            caller = inspect.stack(0)[2]
            tags += [os.path.basename(caller.filename), str(caller.lineno)]
        line = f"{now.strftime('%Y-%m-%dT%H:%M:%S.%f')}000 [{':'.join(tags)}] {message}"
        with self._lock:
            if self.fd is not None:
                _write_line(self.fd, line)
            else:
                print(line, file=self.stream, flush=True)

    def info(self, message: str) -> None:
        self.log("Info", message)

    def error(self, message: str) -> None:
        self.log("Error", message)

    def close(self) -> None:
        with self._lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


def _level(text: str) -> str:
    return "Warning" if text.upper() in ("WARN", "WARNING") else text.title()


class MetricsSink:
    """Metrics lines to the PUT /metrics path, on FlushMetrics and when the VMM ends."""

    def __init__(self, path: str):
        self.fd = open_sink(path, "metrics")
        self.counters: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def count(self, group: str, name: str, amount: int = 1) -> None:
        with self._lock:
            bucket = self.counters.setdefault(group, {})
            bucket[name] = bucket.get(name, 0) + amount

    def flush(self, extra: dict | None = None) -> None:
        """One line; Firecracker's counters are deltas since the previous flush."""
        with self._lock:
            body = {"utc_timestamp_ms": int(time.time() * 1000), **self.counters,
                    **(extra or {})}
            self.counters = {}
            _write_line(self.fd, json.dumps(body, sort_keys=True))

    def close(self) -> None:
        os.close(self.fd)
