"""Where guest console output goes (the serial port's and the virtio console's)."""

from __future__ import annotations

import threading
from typing import BinaryIO


class ConsoleRouter:
    """In command mode the guest's boot log is held back (or streamed to stderr with
    --verbose) until /init says the command starts; from then on, output is the
    command's and goes to stdout."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, command_mode: bool, verbose: bool):
        self.stdout, self.stderr = stdout, stderr
        self.command_mode = command_mode
        self.verbose = verbose
        self.command_started = not command_mode
        self.boot_log = bytearray()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.command_started:
                self.stdout.write(data)
                self.stdout.flush()
                return
            self.boot_log += data
            del self.boot_log[:-1 << 20]  # keep the last MiB
            if self.verbose:
                self.stderr.write(data)
                self.stderr.flush()

    def flush(self) -> None:
        for stream in (self.stdout, self.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass

    def start_command(self) -> None:
        with self._lock:
            self.command_started = True
