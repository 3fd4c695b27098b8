"""What the device benches share about their flat guests (bench/guests/*.S):
ring-3 code that owns a virtio device's queue and BAR.

- :func:`assemble`: a guest source into a flat binary linked for its load address;
- :class:`Waiter`: the port (WAIT_PORT) an idle guest reads to wait for the
  device's interrupt (ring 3 cannot ``hlt``): one exit per wait;
- :class:`EventfdWaiter`: the same register over an eventfd that a C device
  (bench/blk_c.py) signals itself;
- :func:`cpu_seconds`: a process's or thread's CPU time, from /proc;
- :func:`run_queue_seconds`: how long a thread waited for a CPU, from /proc.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading
from pathlib import Path

WAIT_TIMEOUT = 0.005                    # a waiting guest looks again after this at the latest
# The wait register's port (4 ports, a multiple of 8: guests/user_tables.inc grants one
# bitmap byte). Free in the bench VMs and in pykvm's machine (pykvm/layout.py: i8042
# 0x60, RTC 0x70, the guest-control ports 0xF4-0xF5, COM1, ACPI PM 0x600, PCI 0xCF8)
# and not one KVM serves in the kernel (PIC, PIT, speaker port 0x61, ELCR 0x4D0).
# A port, not an MMIO page: from ring 3 on kvm_pvm a port read is the cheaper exit
# (bench/RESULTS.md, blk: "the bench guests wait through port I/O").
WAIT_PORT = 0xE0


class BenchError(Exception):
    pass


def assemble(source: Path, workdir: Path, load_addr: int) -> bytes:
    """``source`` assembled with GNU as and linked with ld as a flat binary for ``load_addr``,
    with WAIT_PORT defined (the guests' user_tables.inc grants ring 3 that port)."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (apt-get install binutils)")
    obj, out = workdir / f"{source.stem}.o", workdir / f"{source.stem}.bin"
    for argv in (["as", "--64", "-I", str(source.parent), f"--defsym=WAIT_PORT={WAIT_PORT:#x}",
                  "-o", str(obj), str(source)],
                 ["ld", "-m", "elf_x86_64", f"-Ttext={load_addr:#x}", "--oformat", "binary",
                  "-o", str(out), str(obj)]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr.strip()}")
    return out.read_bytes()


class Waiter:
    """What an idle guest waits on: the device's interrupt. It is the function's INTx
    line (no MSI-X here) or a virtio-mmio device's edge line, and a port (WAIT_PORT, on
    the VM's port-I/O bus) whose read returns once the line went up (or after
    WAIT_TIMEOUT), acknowledging the interrupt (a PCI ISR read; ``acknowledge`` for
    another transport)."""

    name = "bench-wait"

    def __init__(self, function, acknowledge=None):
        self.event = threading.Event()
        if acknowledge is None:
            from pykvm.devices.virtio.pci import ISR_OFFSET
            acknowledge = lambda: function.bar_devices[0].read(ISR_OFFSET, 1)  # noqa: E731
        self._isr = acknowledge

    def set_level(self, high: bool) -> None:
        if high:
            self.event.set()

    def pulse(self) -> None:
        self.event.set()

    def read(self, offset: int, size: int) -> int:
        self.event.wait(WAIT_TIMEOUT)
        self.event.clear()
        return self._isr()

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class EventfdWaiter:
    """:class:`Waiter` for a device that signals an eventfd (``fd``) instead of an
    interrupt line: the guest's read returns once it was signalled (or after
    WAIT_TIMEOUT) and drains it -- one exit per wait, as with :class:`Waiter`, with no
    Python between the device and the waiting vCPU thread but this read."""

    name = "bench-wait"

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(self.fd, select.POLLIN)
        self._timeout_ms = int(WAIT_TIMEOUT * 1000)

    def set_level(self, high: bool) -> None:
        """A transport's INTx (a configuration interrupt) wakes the waiter too."""
        if high:
            os.eventfd_write(self.fd, 1)

    def pulse(self) -> None:
        os.eventfd_write(self.fd, 1)

    def read(self, offset: int, size: int) -> int:
        if self._poller.poll(self._timeout_ms):
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass
        return 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """user + system CPU time of a process (or one of its threads), from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_queue_seconds(pid: int, tid: int) -> float:
    """How long a thread has waited on a run queue for a CPU after it became runnable
    (woken, or preempted), from /proc/PID/task/TID/schedstat's second field: the
    wake-up latency a request pays on top of CPU time. 0.0 without schedstats."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    except OSError:
        return 0.0
    return int(fields[1]) / 1e9
