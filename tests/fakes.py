"""Fakes for unit-testing a device's logic without KVM (the only place fakes belong)."""

from pykvm.bus import IrqLine


class FakeIrqLine(IrqLine):
    """Records every level a device drives its interrupt line to."""

    def __init__(self):
        self.levels = []

    def set_level(self, high):
        self.levels.append(bool(high))

    @property
    def high(self):
        return bool(self.levels) and self.levels[-1]


def wait_for(predicate, timeout=5.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False):
    for device threads that answer asynchronously."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False
