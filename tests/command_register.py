"""The command register a flat test or bench guest polls for work (tests/guests/hostile.S,
bench/guests/blk_loop.S): an MMIO register whose read blocks until the host posts a
command, so the guest needs no interrupt to learn of it.

A read returns the posted value, or 0 after a short while without one, so that the
vCPU comes back to the host often enough to be stopped between commands.
"""

import queue

POLL_TIMEOUT = 0.05                     # a read with nothing posted returns 0 after this


class CommandRegister:
    """The register: :attr:`pending` takes what the host posts (``pending.put(1)``)."""

    def __init__(self, name: str = "command"):
        self.name = name
        self.pending: queue.Queue[int] = queue.Queue()

    def read(self, offset: int, size: int) -> int:
        try:
            return self.pending.get(timeout=POLL_TIMEOUT)
        except queue.Empty:
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """Writes are ignored: the guest only reads its commands."""
