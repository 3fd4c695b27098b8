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
