"""How `pykvm run` ends: the signals that stop a guest, and the exit status and the
one line a stop becomes.

SIGINT/SIGTERM ask the VM to stop (the machine then releases TAPs, bridges and
helpers it set up); a second SIGINT within a second ends the process at once.
While the machine is still being set up SIGTERM unwinds like Ctrl-C. The status
follows README's "exit statuses": a command's own, 128+N for signal N, 0 for a
guest that powered itself off.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def terminate_during_setup(signum, frame):
    raise SystemExit(128 + signum)


def install_stop_signals(machine) -> None:
    """SIGINT/SIGTERM stop the VM gracefully; a second SIGINT within a second forces it."""
    last_interrupt = [0.0]

    def on_signal(signum, frame):
        now = time.monotonic()
        if signum == signal.SIGINT and now - last_interrupt[0] < 1.0:
            machine.close()
            os._exit(130)
        last_interrupt[0] = now
        name = signal.Signals(signum).name
        machine.request_stop("signal", 128 + signum, f"stopped by {name}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def report_stop(stop, config) -> int:
    if stop is None:
        print("pykvm: error: the VM did not stop", file=sys.stderr)
        return 1
    if stop.kind in ("error", "crash"):
        print(f"pykvm: error: {stop.message}", file=sys.stderr)
        return stop.status or 1
    if stop.kind in ("poweroff", "halt") or (config.command is None and stop.kind != "exit"):
        # A guest that powers itself off (ACPI S5; without ACPI Linux halts with interrupts
        # off instead) has finished, with a command or without: status 0.
        print(f"pykvm: {stop.message}", file=sys.stderr)
    elif config.command is not None and stop.kind != "exit":
        print(f"pykvm: the guest stopped before the command finished: {stop.message}",
              file=sys.stderr)
        return stop.status or 1
    return stop.status
