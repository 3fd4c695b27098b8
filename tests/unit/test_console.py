"""The host console: raw mode on a real pseudo-terminal, pipes, /dev/null, Ctrl-A x."""

import io
import os
import queue
import signal
import subprocess
import sys
import termios
import threading
import time
from contextlib import contextmanager

import pytest

from pykvm.console import EscapeFilter, HostConsole

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Collector:
    def __init__(self):
        self.chunks = queue.Queue()
        self.quit = threading.Event()
        self.eof = threading.Event()

    def __call__(self, data):
        self.chunks.put(data)

    def read(self, count, timeout=5):
        data = b""
        deadline = time.monotonic() + timeout
        while len(data) < count:
            data += self.chunks.get(timeout=max(deadline - time.monotonic(), 0.01))
        return data


@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


# --- the escape sequence --------------------------------------------------------

def test_escape_filter_passes_plain_bytes():
    assert EscapeFilter().feed(b"ls -l\r") == (b"ls -l\r", False)


def test_escape_filter_quits_on_ctrl_a_x_even_across_reads():
    escape = EscapeFilter()
    assert escape.feed(b"abc\x01") == (b"abc", False)
    assert escape.feed(b"x") == (b"", True)


def test_escape_filter_ctrl_a_twice_is_one_ctrl_a():
    assert EscapeFilter().feed(b"\x01\x01e") == (b"\x01e", False)


def test_escape_filter_ctrl_a_then_other_key_passes_both():
    assert EscapeFilter().feed(b"\x01c") == (b"\x01c", False)


# --- a real terminal ------------------------------------------------------------

def test_raw_mode_is_set_and_restored_on_a_terminal(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert before[3] & termios.ICANON     # a fresh pty is cooked
    collector = Collector()
    with HostConsole(slave, collector) as console:
        assert console.raw
        iflag, oflag, cflag, lflag = termios.tcgetattr(slave)[:4]
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
        assert not iflag & (termios.ICRNL | termios.IXON)
        assert oflag & termios.OPOST      # pykvm's own messages still render
        os.write(master, b"ls\r\x03")     # Enter and Ctrl-C reach the guest as bytes
        assert collector.read(4) == b"ls\r\x03"
    assert termios.tcgetattr(slave) == before
    assert not console.raw


def test_ctrl_a_x_calls_on_quit_and_stops_reading(pty_pair):
    master, slave = pty_pair
    collector = Collector()
    with HostConsole(slave, collector, on_quit=collector.quit.set):
        os.write(master, b"abc\x01\x01\x01x")
        assert collector.quit.wait(5)
        assert collector.read(4) == b"abc\x01"
        os.write(master, b"late")
        time.sleep(0.1)
        assert collector.chunks.empty()


def test_restore_is_idempotent(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    console = HostConsole(slave, Collector())
    console.start()
    console.restore_terminal()
    console.restore_terminal()
    console.stop()
    console.stop()
    assert termios.tcgetattr(slave) == before


@contextmanager
def raw_console_child(slave, ending):
    """A child pykvm-like process whose stdin is the pty, run until it reports raw and
    then given to the body with ``ending`` still to run; killed and its pipe closed on the
    way out, after which the terminal must be as it was before the child started."""
    before = termios.tcgetattr(slave)
    script = (
        "import sys, time\n"
        "from pykvm.console import HostConsole\n"
        "console = HostConsole(sys.stdin.buffer, lambda data: None)\n"
        "console.start()\n"
        "print('raw' if console.raw else 'cooked', flush=True)\n"
        f"{ending}\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=slave,
                             stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert child.stdout.readline() == b"raw\n"
        yield child
    finally:
        child.kill()
        child.stdout.close()
    assert termios.tcgetattr(slave) == before


def test_sigterm_restores_the_terminal_then_terminates(pty_pair):
    master, slave = pty_pair
    with raw_console_child(slave, "time.sleep(60)") as child:
        assert not termios.tcgetattr(slave)[3] & termios.ICANON
        child.send_signal(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM    # the signal still kills it


def test_exit_without_close_restores_the_terminal(pty_pair):
    master, slave = pty_pair
    with raw_console_child(slave, "sys.exit(3)") as child:
        assert child.wait(10) == 3


# --- not a terminal ---------------------------------------------------------------

def test_pipe_is_forwarded_verbatim_until_eof():
    read_fd, write_fd = os.pipe()
    collector = Collector()
    try:
        with HostConsole(read_fd, collector, on_quit=collector.quit.set,
                         on_eof=collector.eof.set) as console:
            assert not console.raw
            os.write(write_fd, b"echo hi\n\x01x")   # no escape on a pipe
            os.close(write_fd)
            write_fd = -1
            assert collector.eof.wait(5)
            assert collector.read(10) == b"echo hi\n\x01x"
            assert not collector.quit.is_set()
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_dev_null_ends_at_once_without_spinning():
    fd = os.open(os.devnull, os.O_RDONLY)
    collector = Collector()
    try:
        console = HostConsole(fd, collector, on_eof=collector.eof.set)
        started = time.process_time()
        console.start()
        assert collector.eof.wait(5)
        reader = console._reader
        reader.join(5)
        assert not reader.is_alive()
        console.stop()
        assert time.process_time() - started < 1.0
        assert collector.chunks.empty()
    finally:
        os.close(fd)


def test_closed_stdin_is_tolerated():
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    with HostConsole(read_fd, Collector()) as console:
        assert not console.raw


def test_stream_without_a_descriptor_is_read_to_its_end():
    collector = Collector()
    with HostConsole(io.BytesIO(b"typed ahead\x01x"), collector, on_eof=collector.eof.set):
        assert collector.eof.wait(5)
        assert collector.read(13) == b"typed ahead\x01x"


def test_sys_stdin_buffer_style_stream_is_read_through_its_descriptor(pty_pair):
    master, slave = pty_pair
    collector = Collector()
    with os.fdopen(os.dup(slave), "rb", buffering=0) as stream:
        with HostConsole(stream, collector) as console:
            assert console.raw
            os.write(master, b"q")
            assert collector.read(1) == b"q"
