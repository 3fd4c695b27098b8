"""The two port devices flat test guests talk to: a serial transmitter that records what
the guest prints, and the exit port (layout.EXIT_PORT) that stops the VM with the status
the guest writes. Real devices on a real VM's bus, only smaller than pykvm's own: a test
reads :attr:`SerialOut.data` directly instead of going through a console."""

from pykvm.bus import Device

LSR = 5                                 # 8250 line status register (offset from the base)
LSR_IDLE = 0x60                         # THRE | TEMT: the transmitter takes a byte now


class SerialOut(Device):
    """An 8250's transmitter at its base port: bytes written to THR (offset 0) are kept in
    :attr:`data`; LSR always says the transmitter is empty, so a polling guest never waits."""

    name = "serial"

    def __init__(self):
        self.data = bytearray()

    def write(self, offset, size, value):
        if offset == 0:
            self.data.append(value & 0xFF)

    def read(self, offset, size):
        return LSR_IDLE if offset == LSR else 0


class ExitPort(Device):
    """A write stops ``vm`` with the value written as the exit status."""

    name = "exit"

    def __init__(self, vm):
        self.vm = vm

    def write(self, offset, size, value):
        self.vm.request_stop("exit", value, f"guest exit {value}")
