"""The 16550A model, driven the way Linux's 8250 driver drives it."""

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices.serial import (
    BufferedOutput, Serial, DLL, DLM, FCR, IER, IIR, LCR, LSR, MCR, MSR, RBR, SCR, THR,
    IER_MSI, IER_RDI, IER_RLSI, IER_THRI, LSR_DR, LSR_OE, LSR_TEMT, LSR_THRE,
    MCR_DTR, MCR_LOOP, MCR_OUT1, MCR_OUT2, MCR_RTS,
)

from ..fakes import FakeIrqLine


class Sink:
    """A callable output that records each batch it is given."""

    def __init__(self):
        self.batches = []
        self.arrived = threading.Event()

    def __call__(self, data):
        self.batches.append(bytes(data))
        self.arrived.set()

    @property
    def data(self):
        return b"".join(self.batches)


@pytest.fixture
def irq():
    return FakeIrqLine()


@pytest.fixture
def sink():
    return Sink()


@pytest.fixture
def uart(irq, sink):
    serial = Serial(irq, sink, flush_delay=None)
    yield serial
    serial.close()


def inb(uart, reg):
    return uart.read(reg, 1)


def outb(uart, reg, value):
    uart.write(reg, 1, value)


# --- Linux's probe, step by step (drivers/tty/serial/8250/8250_port.c) ------------

def linux_autoconfig(uart):
    """The decisions autoconfig() and autoconfig_16550a() take, in their order."""
    saved_ier = inb(uart, IER)
    outb(uart, IER, 0)
    scratch2 = inb(uart, IER) & 0x0F
    outb(uart, IER, 0x0F)
    scratch3 = inb(uart, IER) & 0x0F
    outb(uart, IER, saved_ier)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "none (IER test)"
    save_mcr, save_lcr = inb(uart, MCR), inb(uart, LCR)
    outb(uart, MCR, MCR_LOOP | 0x0A)
    status = inb(uart, MSR) & 0xF0
    outb(uart, MCR, save_mcr)
    if status != 0x90:
        return "none (loop test)"
    outb(uart, LCR, 0xBF)
    outb(uart, FCR, 0)          # the EFR, on chips that have one
    outb(uart, LCR, 0)
    outb(uart, FCR, 0x01)
    kind = inb(uart, IIR) >> 6
    if kind != 3:
        return {0: "8250/16450", 1: "unknown", 2: "16550"}[kind]
    # autoconfig_16550a: rule out the chips that extend it.
    outb(uart, LCR, 0x80)
    if inb(uart, IIR) == 0:
        return "ST16C650V1"
    outb(uart, LCR, 0xBF)
    if inb(uart, IIR) == 0:
        return "ST16650V2"
    outb(uart, LCR, 0)
    status1 = inb(uart, MCR)
    outb(uart, LCR, 0xE0)
    if not (inb(uart, 2) ^ status1) & MCR_LOOP:
        outb(uart, LCR, 0)
        outb(uart, MCR, status1 ^ MCR_LOOP)
        outb(uart, LCR, 0xE0)
        status2 = inb(uart, 2)
        outb(uart, LCR, 0)
        outb(uart, MCR, status1)
        if (status2 ^ status1) & MCR_LOOP:
            return "NS16550A"
    outb(uart, LCR, 0)
    outb(uart, FCR, 0x21)
    status1 = inb(uart, IIR) >> 5
    outb(uart, FCR, 0x01)
    outb(uart, LCR, 0x80)
    outb(uart, FCR, 0x21)
    status2 = inb(uart, IIR) >> 5
    outb(uart, FCR, 0x01)
    outb(uart, LCR, 0)
    if status1 == 6 and status2 == 7:
        return "16750"
    ier = inb(uart, IER)
    outb(uart, IER, ier & ~0x40)
    if not inb(uart, IER) & 0x40:
        outb(uart, IER, ier | 0x40)
        if inb(uart, IER) & 0x40:
            return "XScale"
    outb(uart, IER, ier)
    if size_fifo(uart) == 64:
        return "U6_16550A"
    outb(uart, LCR, save_lcr)
    return "16550A"


def size_fifo(uart):
    """Linux's FIFO-size count: 256 bytes in loopback, then count what arrived."""
    old_lcr = inb(uart, LCR)
    outb(uart, LCR, 0)
    old_fcr = inb(uart, FCR)            # really IIR, as in the driver
    old_mcr = inb(uart, MCR)
    outb(uart, FCR, 0x07)
    outb(uart, MCR, MCR_LOOP)
    outb(uart, LCR, 0x80)
    old_dl = inb(uart, DLL) | inb(uart, DLM) << 8
    outb(uart, DLL, 1)
    outb(uart, DLM, 0)
    outb(uart, LCR, 0x03)
    for count in range(256):
        outb(uart, THR, count)
    count = 0
    while inb(uart, LSR) & LSR_DR and count < 256:
        inb(uart, RBR)
        count += 1
    outb(uart, FCR, old_fcr)
    outb(uart, MCR, old_mcr)
    outb(uart, LCR, 0x80)
    outb(uart, DLL, old_dl & 0xFF)
    outb(uart, DLM, old_dl >> 8)
    outb(uart, LCR, old_lcr)
    return count


def test_linux_autoconfig_detects_a_16550a(uart, sink):
    assert linux_autoconfig(uart) == "16550A"
    assert sink.data == b""                  # probing prints nothing
    assert uart.rx_dropped == 256 - 16       # size_fifo overran the FIFO, as on hardware


def test_fifo_detection_reads_iir_bits_6_and_7(uart):
    assert inb(uart, IIR) == 0x01
    outb(uart, FCR, 0x01)
    assert inb(uart, IIR) == 0xC1
    outb(uart, FCR, 0x00)
    assert inb(uart, IIR) == 0x01


def test_scratch_register_and_ier_upper_bits(uart):
    outb(uart, SCR, 0xA5)
    assert inb(uart, SCR) == 0xA5
    outb(uart, IER, 0xFF)
    assert inb(uart, IER) == 0x0F


def test_linux_startup_thre_tests_find_no_bugs(uart, irq):
    # serial8250_do_startup: THRE must be re-asserted after IER is toggled.
    outb(uart, IER, IER_THRI)
    iir1 = inb(uart, IIR)
    outb(uart, IER, 0)
    outb(uart, IER, IER_THRI)
    iir = inb(uart, IIR)
    outb(uart, IER, 0)
    assert not iir1 & 0x01 and not iir & 0x01, "UART_BUG_THRE would be set"
    # The TXEN test: enabling THRI with TEMT set must show an interrupt.
    outb(uart, IER, IER_THRI)
    lsr, iir = inb(uart, LSR), inb(uart, IIR)
    outb(uart, IER, 0)
    assert lsr & LSR_TEMT and not iir & 0x01, "UART_BUG_TXEN would be set"
    assert irq.levels == []                  # OUT2 was never set


def test_lsr_never_reads_ff_and_tx_is_always_ready(uart):
    assert inb(uart, LSR) == LSR_THRE | LSR_TEMT
    outb(uart, THR, ord("a"))
    assert inb(uart, LSR) == LSR_THRE | LSR_TEMT


# --- divisor latch ------------------------------------------------------------------

def test_divisor_latch_round_trip_leaves_ier_and_rbr_alone(uart, sink):
    outb(uart, IER, IER_RDI)
    outb(uart, LCR, 0x80 | 0x03)
    outb(uart, DLL, 0x01)
    outb(uart, DLM, 0x02)
    assert inb(uart, DLL) == 0x01 and inb(uart, DLM) == 0x02
    assert uart.read(DLL, 2) == 0x0201       # a word access reads both latches
    outb(uart, LCR, 0x03)
    assert inb(uart, IER) == IER_RDI
    assert inb(uart, LCR) == 0x03
    assert sink.data == b""                  # the DLL write was not transmitted
    outb(uart, LCR, 0x80)
    outb(uart, DLL, 1)
    outb(uart, DLM, 0)
    assert uart.baud == 115200


# --- interrupts ---------------------------------------------------------------------

def test_thre_interrupt_after_enabling_etbei_with_out2(uart, irq):
    outb(uart, MCR, MCR_OUT2)
    assert irq.levels == []
    outb(uart, IER, IER_THRI)
    assert irq.levels == [True]
    assert inb(uart, IIR) == 0x02            # reading IIR acknowledges THRE...
    assert irq.levels == [True, False]
    assert inb(uart, IIR) == 0x01
    outb(uart, THR, ord("x"))                # ...and each transmitted byte raises it again
    assert irq.levels == [True, False, True]
    outb(uart, IER, 0)
    assert irq.levels == [True, False, True, False]


def test_no_line_level_without_out2(uart, irq):
    outb(uart, MCR, MCR_DTR | MCR_RTS)
    outb(uart, IER, IER_THRI)
    assert inb(uart, IIR) == 0x02            # pending inside the UART...
    assert irq.levels == []                  # ...but not wired to the PIC


def test_out2_gates_a_pending_interrupt(uart, irq):
    outb(uart, IER, IER_RDI)
    uart.receive(b"a")
    assert irq.levels == []
    outb(uart, MCR, MCR_OUT2)
    assert irq.levels == [True]
    outb(uart, MCR, 0)
    assert irq.levels == [True, False]


def test_loopback_mode_disconnects_the_interrupt_pin(uart, irq):
    outb(uart, IER, IER_RDI)
    outb(uart, MCR, MCR_OUT2 | MCR_LOOP)
    outb(uart, THR, 0x55)
    assert inb(uart, IIR) == 0x04
    assert irq.levels == []


def test_iir_priorities(uart):
    outb(uart, IER, IER_RLSI | IER_RDI | IER_THRI | IER_MSI)   # THRE now pending
    outb(uart, MCR, MCR_LOOP | MCR_RTS)                      # CTS changes: modem status pending
    outb(uart, THR, 1)                                        # RX gets a byte
    outb(uart, THR, 2)                                        # FIFO off: a 1-byte buffer, so overrun
    assert inb(uart, IIR) == 0x06            # line status first
    assert inb(uart, LSR) & LSR_OE           # reading LSR clears it
    assert inb(uart, IIR) == 0x04            # then received data
    assert inb(uart, RBR) == 1
    assert inb(uart, IIR) == 0x02            # then THRE (cleared by this read)
    assert inb(uart, IIR) == 0x00            # then modem status
    inb(uart, MSR)
    assert inb(uart, IIR) == 0x01


# --- receive ------------------------------------------------------------------------

def drain(uart):
    data = bytearray()
    while inb(uart, LSR) & LSR_DR:
        data.append(inb(uart, RBR))
    return bytes(data)


def test_receive_raises_rx_interrupt_until_drained(uart, irq):
    outb(uart, MCR, MCR_OUT2)
    outb(uart, IER, IER_RDI)
    uart.receive(b"hi")
    assert irq.levels == [True]
    assert inb(uart, IIR) == 0x04
    assert drain(uart) == b"hi"
    assert irq.levels == [True, False]
    assert inb(uart, IIR) == 0x01
    assert uart.rx_bytes == 2


def test_fifo_trigger_level_and_character_timeout(uart):
    outb(uart, FCR, 0x81)                    # FIFO on, trigger at 8 bytes (Linux's choice)
    outb(uart, IER, IER_RDI)
    uart.receive(b"abc")
    assert inb(uart, IIR) == 0xCC            # below the trigger: character timeout
    uart.receive(b"defgh")
    assert inb(uart, IIR) == 0xC4            # at the trigger: data available


def test_pasted_text_waits_on_the_host_and_is_not_lost(uart):
    outb(uart, FCR, 0x01)
    text = bytes(range(256)) * 4
    uart.receive(text)
    assert uart.rx_dropped == 0
    assert drain(uart) == text


def test_without_fifo_the_uart_holds_one_byte_at_a_time(uart):
    uart.receive(b"xyz")
    assert inb(uart, RBR) == ord("x")
    assert drain(uart) == b"yz"
    assert not inb(uart, LSR) & LSR_OE


def test_fifo_overflow_sets_oe_and_counts_the_dropped_byte(uart):
    outb(uart, FCR, 0x01)
    outb(uart, MCR, MCR_LOOP)
    for value in range(17):
        outb(uart, THR, value)
    assert uart.rx_dropped == 1
    lsr = inb(uart, LSR)
    assert lsr & LSR_OE and lsr & LSR_DR
    assert not inb(uart, LSR) & LSR_OE       # cleared by the read
    assert drain(uart) == bytes(range(16))


def test_full_host_queue_drops_and_reports_overrun(irq, sink):
    uart = Serial(irq, sink, host_queue_limit=4, flush_delay=None)
    uart.receive(b"abcdef")                  # 1 byte in the 16450 buffer, 4 queued, 1 lost
    assert uart.rx_dropped == 1
    assert inb(uart, LSR) & LSR_OE
    assert drain(uart) == b"abcde"


def test_fifo_clear_discards_guest_side_bytes_only(uart):
    outb(uart, FCR, 0x01)
    uart.receive(bytes(20))
    outb(uart, FCR, 0x03)                    # clear RX: 16 bytes gone, the other 4 move in
    assert len(drain(uart)) == 4


def test_loopback_echoes_transmit_and_holds_host_input(uart, sink):
    outb(uart, FCR, 0x01)
    outb(uart, MCR, MCR_LOOP)
    uart.receive(b"host")
    outb(uart, THR, ord("L"))
    assert drain(uart) == b"L"
    outb(uart, MCR, 0)
    assert drain(uart) == b"host"
    uart.flush()
    assert sink.data == b""
    assert uart.tx_bytes == 0


def test_host_input_from_another_thread_arrives_in_order(uart):
    outb(uart, FCR, 0x01)
    text = os.urandom(20000)

    def typist():
        for start in range(0, len(text), 37):
            uart.receive(text[start:start + 37])

    thread = threading.Thread(target=typist)
    thread.start()
    received = bytearray()
    while len(received) < len(text):
        received += drain(uart)
    thread.join()
    assert bytes(received) == text


# --- modem status -------------------------------------------------------------------

def test_msr_reports_a_connected_line_and_loopback_deltas(uart, irq):
    assert inb(uart, MSR) == 0xB0            # CTS, DSR, DCD; no deltas
    outb(uart, IER, IER_MSI)
    outb(uart, MCR, MCR_LOOP | MCR_OUT1)     # CTS/DSR/DCD drop, RI rises
    assert inb(uart, IIR) == 0x00
    assert inb(uart, MSR) == 0x40 | 0x0B     # RI; DCTS, DDSR, DDCD
    outb(uart, MCR, MCR_LOOP)                # RI falls: trailing edge
    assert inb(uart, MSR) == 0x04
    assert inb(uart, MSR) == 0x00
    assert inb(uart, IIR) == 0x01


# --- output buffering ---------------------------------------------------------------

def test_output_is_batched_until_newline(uart, sink):
    for byte in b"Linux version":
        outb(uart, THR, byte)
    assert sink.batches == []
    outb(uart, THR, ord("\n"))
    assert sink.batches == [b"Linux version\n"]
    assert uart.tx_bytes == 14


def test_flush_pushes_a_partial_line(uart, sink):
    for byte in b"login: ":
        outb(uart, THR, byte)
    uart.flush()
    assert sink.batches == [b"login: "]
    uart.flush()
    assert sink.batches == [b"login: "]


def test_buffer_size_limits_a_batch(sink):
    output = BufferedOutput(sink, max_buffer=8, flush_delay=None)
    for byte in b"0123456789abcdef":
        output.write_byte(byte)
    assert sink.batches == [b"01234567", b"89abcdef"]


def test_output_is_flushed_when_the_guest_stops_writing(irq, sink):
    uart = Serial(irq, sink, flush_delay=0.01)
    try:
        for byte in b"# ":
            outb(uart, THR, byte)
        assert sink.arrived.wait(5)
        assert sink.data == b"# "
    finally:
        uart.close()


def test_output_to_a_real_pipe(irq):
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb") as writer:
        uart = Serial(irq, writer, flush_delay=None)
        for byte in b"hello\r\nworld":
            outb(uart, THR, byte)
        uart.close()
        writer.close()
        assert reader.read() == b"hello\r\nworld"


def test_output_to_an_unbuffered_pipe_and_to_a_file_like_object(irq):
    class FileLike:
        """Like the VMM's console router: write() returns nothing."""
        def __init__(self):
            self.data = bytearray()

        def write(self, data):
            self.data += data

    file_like = FileLike()
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "wb", buffering=0) as raw:
        for output in (raw, file_like):
            uart = Serial(irq, output, flush_delay=None)
            for byte in b"ok\n":
                outb(uart, THR, byte)
            assert uart.output_errors == 0
        assert reader.read(3) == b"ok\n"
    assert file_like.data == b"ok\n"


def test_host_output_errors_are_counted_not_raised(irq):
    def broken(data):
        raise BrokenPipeError

    uart = Serial(irq, broken, flush_delay=None)
    outb(uart, THR, ord("\n"))
    assert uart.output_errors == 1


# --- robustness ---------------------------------------------------------------------

access = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 7), st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("write"), st.integers(0, 7), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("receive"), st.just(0), st.just(0), st.binary(max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(access, max_size=60))
def test_random_register_traffic_never_raises(operations):
    irq, sink = FakeIrqLine(), Sink()
    uart = Serial(irq, sink, host_queue_limit=64, flush_delay=None)
    for kind, offset, size, value in operations:
        if kind == "read":
            assert 0 <= uart.read(offset, size) < 1 << (8 * size)
        elif kind == "write":
            uart.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            uart.receive(value)
        lsr = uart.read(LSR, 1)
        assert lsr & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
        assert uart.read(MCR, 1) & 0xE0 == 0
    # set_level is called only on changes, so the recorded levels alternate.
    assert all(a != b for a, b in zip(irq.levels, irq.levels[1:]))
    assert not irq.levels or irq.levels[0] is True
