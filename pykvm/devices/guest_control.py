"""pykvm's guest-control ports: how a guest stops the VM and marks boot milestones.

Registered at ``layout.EXIT_PORT`` for 2 ports. A write to EXIT_PORT (0xF4)
calls ``on_exit(status)`` with its low byte, the status pykvm exits with (like
QEMU's isa-debug-exit, but without its ``status * 2 + 1`` encoding). A write
to PROGRESS_PORT (0xF5) records ``(code, time.monotonic())`` in
:attr:`GuestControl.progress` and calls ``on_progress(code)``: the codes are
``layout.PROGRESS_*``. Reads return all ones, as from an empty port.
"""

from __future__ import annotations

import time
from typing import Callable

from ..bus import Device
from ..layout import EXIT_PORT, PROGRESS_PORT

PORT_BASE = EXIT_PORT
PORT_COUNT = 2
EXIT_OFFSET = 0
PROGRESS_OFFSET = PROGRESS_PORT - EXIT_PORT


class GuestControl(Device):
    name = "guest-control"

    def __init__(self, on_exit: Callable[[int], object], *,
                 on_progress: Callable[[int], object] | None = None):
        self._on_exit = on_exit
        self._on_progress = on_progress
        self.progress: list[tuple[int, float]] = []

    def write(self, offset: int, size: int, value: int) -> None:
        code = value & 0xFF
        if offset == EXIT_OFFSET:
            self._on_exit(code)     # may raise to unwind the vCPU loop
        elif offset == PROGRESS_OFFSET:
            self.progress.append((code, time.monotonic()))
            if self._on_progress is not None:
                self._on_progress(code)
