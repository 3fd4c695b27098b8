"""The 8250/16550A UART's registers and bits, as the National Semiconductor PC16550D
datasheet names them (and Linux's include/uapi/linux/serial_reg.h spells them).

Offsets count from the UART's base port (COM1: 0x3F8). With LCR.DLAB set, offsets
0 and 1 are the baud divisor instead of RBR/THR and IER. pykvm/devices/serial.py
models the chip; this module is the map it is written against, kept apart so that
tests and tools can speak register names without the device.
"""

# --- register offsets (from the device's base port) --------------------------
RBR = THR = DLL = 0   # receive buffer / transmit holding / divisor low (DLAB=1)
IER = DLM = 1         # interrupt enable / divisor high (DLAB=1)
IIR = FCR = 2         # interrupt identification (read) / FIFO control (write)
LCR = 3               # line control
MCR = 4               # modem control
LSR = 5               # line status
MSR = 6               # modem status
SCR = 7               # scratch
REGISTER_COUNT = 8

# --- IER ---------------------------------------------------------------------
IER_RDI = 0x01        # received data available (and character timeout)
IER_THRI = 0x02       # transmitter holding register empty
IER_RLSI = 0x04       # receiver line status
IER_MSI = 0x08        # modem status
IER_DEFINED = 0x0F    # a 16550A's upper IER bits read as 0 (Linux's scratch test relies on it)

# --- IIR ---------------------------------------------------------------------
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

# --- FCR ---------------------------------------------------------------------
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
RX_TRIGGER_LEVELS = (1, 4, 8, 14)   # indexed by FCR bits 6-7

# --- LCR ---------------------------------------------------------------------
LCR_DLAB = 0x80

# --- MCR ---------------------------------------------------------------------
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_DEFINED = 0x1F

# --- LSR ---------------------------------------------------------------------
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

# --- MSR ---------------------------------------------------------------------
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# With nothing but pykvm on the other end, the "cable" is always connected and
# ready: clear to send, data set ready, carrier detect; no ring.
MSR_HOST_LINES = MSR_CTS | MSR_DSR | MSR_DCD

FIFO_SIZE = 16
DEFAULT_DIVISOR = 12              # 9600 baud, what a PC BIOS leaves behind
BASE_BAUD = 115200                # 1.8432 MHz clock / 16
