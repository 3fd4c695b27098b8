"""An 8250/16550A UART: the PC's COM port, with the register model Linux probes.

The VM places it at 0x3F8 (COM1, 8 ports) and wires its interrupt to GSI 4.
What is modelled, and why:

- The registers Linux's 8250 autoconfig looks at, so that it reports
  ``ttyS0 ... is a 16550A``: IER keeps only its 4 defined bits (the scratch
  test), loopback mode routes MCR to MSR (the loop test), IIR bits 6-7 say
  "FIFO enabled" once FCR bit 0 is set (FIFO detection), and the RX FIFO holds
  exactly 16 bytes (``size_fifo`` counts them in loopback mode).
- Interrupts with the 16550's priorities (line status > received data or
  character timeout > THR empty > modem status). The THRE interrupt is raised
  on the rising edge of IER.ETBEI and after every transmitted byte, and cleared
  by reading IIR or writing THR: Linux's start-up test and its TX path depend
  on exactly that.
- The PC's interrupt gating: the UART's INTR pin reaches the PIC only through
  MCR.OUT2, and the OUT2 pin is inactive in loopback mode.

What is not modelled: line timing. Transmission is instantaneous (THRE and
TEMT are always set), the baud divisor is stored but unused, and the receive
"character timeout" is deemed to have expired at once, so bytes below the
FIFO trigger level are reported straight away (IIR 0x0C) instead of after four
character times: the guest sees typed input without delay.

Host input that does not fit the FIFO waits in a host-side queue and is fed in
as the guest drains the FIFO, so pasted text is not lost. Guest output is
batched by :class:`BufferedOutput` (serial_output.py) so that a byte-at-a-time
guest does not cost one host system call per byte. The register map is
serial_registers.py's, re-exported here.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Annotated

from ..bus import Device, IrqLine
from ..snapshot.schema import U8, U16, U64, Bounds, blob
from ..snapshot.state import ComponentState, SnapshotError
from .serial_output import BufferedOutput, Output
from .serial_registers import *  # noqa: F403 - the register map, re-exported: the device's vocabulary

HOST_QUEUE_LIMIT = 1 << 20        # host input waiting for the guest; beyond it bytes are dropped


@dataclass(frozen=True)
class SerialState(ComponentState, tag="serial"):
    """Registers, the RX FIFO, host input not yet in it, the interrupt line, counters."""

    ier: Annotated[int, Bounds(0, IER_DEFINED)]
    lcr: U8
    mcr: Annotated[int, Bounds(0, MCR_DEFINED)]
    scr: U8
    divisor: U16
    fifo_enabled: bool
    rx_trigger: int
    rx_fifo: blob(FIFO_SIZE)
    host_queue: blob(HOST_QUEUE_LIMIT)
    overrun: bool
    thr_pending: bool
    msr_deltas: Annotated[int, Bounds(0, 0x0F)]
    irq_level: bool
    tx_bytes: U64
    rx_bytes: U64
    rx_dropped: U64

    def check(self) -> None:
        if self.rx_trigger not in RX_TRIGGER_LEVELS:
            raise SnapshotError(f"serial: RX trigger level {self.rx_trigger}")


class Serial(Device):
    """A 16550A UART. Thread-safe: the vCPU thread and a host input thread share it."""

    name = "serial"

    def __init__(self, irq: IrqLine, output: Output, *,
                 host_queue_limit: int = HOST_QUEUE_LIMIT,
                 flush_delay: float | None = 0.02):
        self._irq = irq
        self._output = BufferedOutput(output, flush_delay=flush_delay)
        self._host_queue_limit = host_queue_limit
        self._lock = threading.Lock()
        self._irq_level = False

        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._fifo_enabled = False
        self._rx_trigger = 1
        self._rx_fifo: deque[int] = deque()
        self._host_queue: deque[int] = deque()  # host input not yet in the FIFO
        self._overrun = False                   # LSR.OE, until LSR is read
        self._thr_pending = False               # THRE interrupt not yet acknowledged
        self._msr_deltas = 0

        # Statistics, for the VMM's report.
        self.tx_bytes = 0
        self.rx_bytes = 0       # bytes the guest read from RBR
        self.rx_dropped = 0     # bytes lost to a full FIFO or a full host queue

    # --- host side -------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes typed or piped on the host, towards the guest's RX FIFO."""
        with self._lock:
            room = self._host_queue_limit - len(self._host_queue)
            if not self._mcr & MCR_LOOP:
                room += max(self._rx_capacity() - len(self._rx_fifo), 0)
            if len(data) > room:
                # Beyond the queue the bytes are lost; tell the guest as a real
                # UART would, with an overrun.
                self.rx_dropped += len(data) - room
                self._overrun = True
                data = data[:room]
            self._host_queue.extend(data)
            self._refill_rx_fifo()
            self._update_irq()

    def flush(self) -> None:
        """Push buffered guest output to the host now (the VMM calls it at exit)."""
        self._output.flush()

    def close(self) -> None:
        self._output.close()

    # --- snapshots (pykvm/snapshot) ---------------------------------------------

    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(
                ier=self._ier, lcr=self._lcr, mcr=self._mcr, scr=self._scr,
                divisor=self._divisor, fifo_enabled=self._fifo_enabled,
                rx_trigger=self._rx_trigger, rx_fifo=bytes(self._rx_fifo),
                host_queue=bytes(self._host_queue), overrun=self._overrun,
                thr_pending=self._thr_pending, msr_deltas=self._msr_deltas,
                irq_level=self._irq_level, tx_bytes=self.tx_bytes, rx_bytes=self.rx_bytes,
                rx_dropped=self.rx_dropped)

    def restore_state(self, state: SerialState) -> None:
        with self._lock:
            self._ier, self._lcr, self._mcr, self._scr = state.ier, state.lcr, state.mcr, state.scr
            self._divisor = state.divisor
            self._fifo_enabled = state.fifo_enabled
            self._rx_trigger = state.rx_trigger
            self._rx_fifo = deque(state.rx_fifo)
            self._host_queue = deque(state.host_queue[:self._host_queue_limit])
            self._overrun = state.overrun
            self._thr_pending = state.thr_pending
            self._msr_deltas = state.msr_deltas
            self.tx_bytes, self.rx_bytes = state.tx_bytes, state.rx_bytes
            self.rx_dropped = state.rx_dropped
            # The new VM's line is low: raise it again if the UART held it high.
            self._irq_level = False
            if state.irq_level:
                self._irq_level = True
                self._irq.set_level(True)

    @property
    def baud(self) -> int:
        """The rate the guest programmed (informational: no timing is modelled)."""
        return BASE_BAUD // self._divisor if self._divisor else 0

    @property
    def output_errors(self) -> int:
        return self._output.errors

    # --- guest side ------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if size == 1:
                value = self._read_register(offset)
            else:
                # Wider accesses touch consecutive registers, as on the ISA bus.
                value = 0
                for index in range(size):
                    byte = self._read_register(offset + index) if offset + index < REGISTER_COUNT else 0xFF
                    value |= byte << (8 * index)
            self._update_irq()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if size == 1:
                self._write_register(offset, value & 0xFF)
            else:
                for index in range(size):
                    if offset + index < REGISTER_COUNT:
                        self._write_register(offset + index, (value >> (8 * index)) & 0xFF)
            self._update_irq()

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._divisor & 0xFF if dlab else self._pop_rx()
        if offset == IER:
            return self._divisor >> 8 if dlab else self._ier
        if offset == IIR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            return self._read_lsr()
        if offset == MSR:
            return self._read_msr()
        if offset == SCR:
            return self._scr
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value & IER_DEFINED)
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value & MCR_DEFINED)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR writes are factory-test features of the real chip: ignored.

    # --- transmit --------------------------------------------------------------

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            # Loopback: the transmitter's output feeds the receiver, nothing leaves.
            self._push_rx(value)
        else:
            self.tx_bytes += 1
            self._output.write_byte(value)
        # Transmission is instantaneous, so the holding register is empty again.
        self._thr_pending = True

    def _write_ier(self, value: int) -> None:
        if (self._ier ^ value) & IER_THRI:
            # A rising ETBEI with THR empty raises THRE at once (Linux's start-up
            # test checks it is re-raised after IER is toggled); a falling one forgets it.
            self._thr_pending = bool(value & IER_THRI)
        self._ier = value

    # --- receive ---------------------------------------------------------------

    def _rx_capacity(self) -> int:
        # Without its FIFO the 16550 behaves as a 16450: a single receive buffer.
        return FIFO_SIZE if self._fifo_enabled else 1

    def _push_rx(self, value: int) -> None:
        if len(self._rx_fifo) < self._rx_capacity():
            self._rx_fifo.append(value)
        else:
            self._overrun = True
            self.rx_dropped += 1

    def _refill_rx_fifo(self) -> None:
        # In loopback mode the receiver is disconnected from the outside line.
        if self._mcr & MCR_LOOP:
            return
        capacity = self._rx_capacity()
        while self._host_queue and len(self._rx_fifo) < capacity:
            self._rx_fifo.append(self._host_queue.popleft())

    def _pop_rx(self) -> int:
        if not self._rx_fifo:
            return 0
        value = self._rx_fifo.popleft()
        self.rx_bytes += 1
        self._refill_rx_fifo()
        return value

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE_FIFO)
        if enable != self._fifo_enabled:
            self._rx_fifo.clear()       # the chip resets both FIFOs when the mode changes
            self._fifo_enabled = enable
        if enable:
            if value & FCR_CLEAR_RCVR:
                self._rx_fifo.clear()
            # FCR_CLEAR_XMIT: the transmit FIFO is always empty here.
            self._rx_trigger = RX_TRIGGER_LEVELS[value >> 6]
        self._refill_rx_fifo()

    # --- status ----------------------------------------------------------------

    def _read_lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT
        if self._rx_fifo:
            value |= LSR_DR
        if self._overrun:
            value |= LSR_OE
            self._overrun = False   # error bits clear when LSR is read
        return value

    def _modem_lines(self) -> int:
        if self._mcr & MCR_LOOP:
            # The 16550's loopback wiring: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
            mcr = self._mcr
            return ((MSR_CTS if mcr & MCR_RTS else 0) | (MSR_DSR if mcr & MCR_DTR else 0)
                    | (MSR_RI if mcr & MCR_OUT1 else 0) | (MSR_DCD if mcr & MCR_OUT2 else 0))
        return MSR_HOST_LINES

    def _write_mcr(self, value: int) -> None:
        before = self._modem_lines()
        leaving_loopback = self._mcr & MCR_LOOP and not value & MCR_LOOP
        self._mcr = value
        after = self._modem_lines()
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if before & MSR_RI and not after & MSR_RI:   # trailing edge only
            self._msr_deltas |= MSR_TERI
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if leaving_loopback:
            self._refill_rx_fifo()

    def _read_msr(self) -> int:
        value = self._modem_lines() | self._msr_deltas
        self._msr_deltas = 0
        return value

    # --- interrupts --------------------------------------------------------------

    def _interrupt_id(self) -> int:
        """The highest-priority pending and enabled interrupt (IIR bits 0-3)."""
        ier = self._ier
        if ier & IER_RLSI and self._overrun:
            return IIR_RLSI
        if ier & IER_RDI and self._rx_fifo:
            if self._fifo_enabled and len(self._rx_fifo) < self._rx_trigger:
                return IIR_RX_TIMEOUT
            return IIR_RDI
        if ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        if ier & IER_MSI and self._msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _read_iir(self) -> int:
        interrupt = self._interrupt_id()
        if interrupt == IIR_THRI:
            self._thr_pending = False   # reading IIR acknowledges THRE
        return interrupt | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)

    def _update_irq(self) -> None:
        # Runs after every access: the common case (line low and gated off, as
        # while Linux's console polls) is decided without looking at the sources.
        gated_on = self._mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
        if not gated_on and not self._irq_level:
            return
        level = gated_on and self._interrupt_id() != IIR_NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
