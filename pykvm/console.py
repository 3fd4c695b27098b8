"""The host side of the guest console: stdin in, with a way out.

:class:`HostConsole` forwards whatever arrives on stdin to a callable (the serial
device's ``receive``). When stdin is the foreground terminal it is switched to
raw mode, so that every key (Ctrl-C, arrows, tab) reaches the guest, and
Ctrl-A x quits pykvm, as in QEMU; Ctrl-A Ctrl-A sends one Ctrl-A. Output
processing is left on (QEMU does the same), so pykvm's own messages still
start at the beginning of a line.

The terminal must never be left raw, whatever ends pykvm: the settings are
restored when the context manager exits, at interpreter exit (atexit), and on
SIGTERM and SIGHUP before the signal takes its course. SIGKILL cannot be
caught; ``stty sane`` is the cure then.

When stdin is a pipe, a file or /dev/null nothing is changed and no escape is
recognised (a piped script may contain any bytes): the reader forwards data
until end of file, then calls ``on_eof`` and stops.
"""

from __future__ import annotations

import atexit
import errno
import io
import os
import selectors
import signal
import termios
import threading
from typing import BinaryIO, Callable

ESCAPE = 0x01       # Ctrl-A
QUIT_KEY = ord("x")
RESTORE_ON_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
READ_CHUNK = 4096


class EscapeFilter:
    """Finds Ctrl-A x in a byte stream; everything else passes through.

    Ctrl-A followed by Ctrl-A gives one Ctrl-A; followed by any other byte, both
    bytes go through unchanged (so nothing typed is lost). A Ctrl-A at the end
    of one read waits for the next read to be decided.
    """

    def __init__(self):
        self._after_escape = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Returns (bytes to forward, whether the quit sequence was seen)."""
        if not self._after_escape and ESCAPE not in data:
            return data, False
        out = bytearray()
        for byte in data:
            if self._after_escape:
                self._after_escape = False
                if byte == QUIT_KEY:
                    return bytes(out), True
                if byte != ESCAPE:
                    out.append(ESCAPE)
                out.append(byte)
            elif byte == ESCAPE:
                self._after_escape = True
            else:
                out.append(byte)
        return bytes(out), False


def raw_mode_attributes(attributes: list) -> list:
    """termios attributes for raw input, with output processing kept on."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attributes
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag |= termios.OPOST
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class HostConsole:
    """stdin -> ``forward(bytes)`` on a reader thread, between :meth:`start` and :meth:`stop`.

    ``stdin`` is a file descriptor or a stream with one (``sys.stdin.buffer``);
    a stream without one (``io.BytesIO``) is read to its end, as a pipe would be.
    ``on_quit`` is called on Ctrl-A x, ``on_eof`` at the end of input, both
    on the reader thread. ``escape`` forces the Ctrl-A handling on or off; by
    default it is on for a terminal only.
    """

    def __init__(self, stdin: int | BinaryIO, forward: Callable[[bytes], object], *,
                 on_quit: Callable[[], object] | None = None,
                 on_eof: Callable[[], object] | None = None,
                 escape: bool | None = None):
        self._forward = forward
        self._on_quit = on_quit
        self._on_eof = on_eof
        self._stream: BinaryIO | None = None
        self._fd = _fileno(stdin)
        if self._fd is None:
            self._stream = stdin
            self._fd = -1
        self._escape_wanted = escape
        self._escape: EscapeFilter | None = None
        self._saved_attributes: list | None = None
        self._previous_handlers: dict[int, object] = {}
        self._wake_read = self._wake_write = -1
        self._reader: threading.Thread | None = None
        self._restore_lock = threading.RLock()

    # --- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> "HostConsole":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        if self._stream is not None:
            self._escape = EscapeFilter() if self._escape_wanted else None
            self._reader = threading.Thread(target=self._read_stream, name="console-input",
                                            daemon=True)
            self._reader.start()
            return
        if not _is_open(self._fd):
            return      # no stdin at all (closed by the caller): nothing to read
        terminal = os.isatty(self._fd)
        if terminal and _in_background(self._fd):
            # Reading or changing a terminal from a background process group would
            # stop pykvm with SIGTTIN/SIGTTOU; the guest just gets no input.
            return
        if terminal:
            self._enter_raw_mode()
        if self._escape_wanted if self._escape_wanted is not None else terminal:
            self._escape = EscapeFilter()
        self._wake_read, self._wake_write = os.pipe()
        self._reader = threading.Thread(target=self._read_loop, name="console-input", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """Stop the reader and give the terminal back. Safe to call more than once."""
        reader = self._reader
        if reader is not None and self._stream is not None:
            # A stream without a descriptor cannot be woken; it never blocks for long.
            self._reader = None
        elif reader is not None:
            try:
                os.write(self._wake_write, b"\0")
            except OSError:
                pass
            if reader is not threading.current_thread():
                reader.join()
            self._reader = None
            for fd in (self._wake_read, self._wake_write):
                os.close(fd)
            self._wake_read = self._wake_write = -1
        self.restore_terminal()

    @property
    def raw(self) -> bool:
        """Whether this console has the terminal in raw mode now."""
        return self._saved_attributes is not None

    # --- the terminal ---------------------------------------------------------------

    def _enter_raw_mode(self) -> None:
        saved = termios.tcgetattr(self._fd)
        # Registered before the change, so that no exit path can miss the restore.
        self._saved_attributes = saved
        atexit.register(self.restore_terminal)
        self._install_signal_handlers()
        termios.tcsetattr(self._fd, termios.TCSANOW, raw_mode_attributes(saved))

    def restore_terminal(self) -> None:
        """Put the terminal settings back; idempotent, usable from a signal handler."""
        # Re-entrant: a signal handler may interrupt stop() in the same thread.
        # The settings are forgotten only after they are back on the terminal, so
        # an interrupting restore still does the work.
        with self._restore_lock:
            saved = self._saved_attributes
            if saved is None:
                return
            try:
                termios.tcsetattr(self._fd, termios.TCSANOW, saved)
            except (termios.error, OSError):
                pass    # the terminal is gone (hang-up): nothing left to restore
            self._saved_attributes = None
            atexit.unregister(self.restore_terminal)
            self._uninstall_signal_handlers()

    def _install_signal_handlers(self) -> None:
        for signum in RESTORE_ON_SIGNALS:
            try:
                previous = signal.getsignal(signum)
                if previous == signal.SIG_IGN:
                    continue    # e.g. under nohup: the signal will not end us
                signal.signal(signum, self._on_signal)
            except ValueError:
                return          # not the main thread: atexit and stop() still restore
            self._previous_handlers[signum] = previous

    def _uninstall_signal_handlers(self) -> None:
        for signum, previous in self._previous_handlers.items():
            try:
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, previous)
            except ValueError:
                pass
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        self.restore_terminal()
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            # Let the signal do what it would have done, with the terminal sane.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # --- input ----------------------------------------------------------------------

    def _deliver(self, data: bytes) -> bool:
        """Forwards one read's worth; returns whether to keep reading."""
        if not data:
            if self._on_eof is not None:
                self._on_eof()
            return False
        quit_requested = False
        if self._escape is not None:
            data, quit_requested = self._escape.feed(data)
        if data:
            self._forward(data)
        if quit_requested:
            if self._on_quit is not None:
                self._on_quit()
            return False
        return True

    def _read_stream(self) -> None:
        stream = self._stream
        read = getattr(stream, "read1", stream.read)
        while self._reader is not None:
            try:
                data = read(READ_CHUNK)
            except (OSError, ValueError):
                data = b""
            if not self._deliver(data or b""):
                return

    def _read_loop(self) -> None:
        # poll, not epoll: epoll refuses regular files and /dev/null, which
        # poll reports as always readable (and read() then says EOF).
        with selectors.PollSelector() as selector:
            selector.register(self._fd, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                ready = {key.fd for key, _ in selector.select()}
                if self._wake_read in ready:
                    return
                try:
                    data = os.read(self._fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as error:
                    if error.errno == errno.EINTR:
                        continue
                    data = b""  # EIO: the terminal hung up; same as end of input
                if not self._deliver(data):
                    return


def _fileno(stdin: int | BinaryIO) -> int | None:
    if isinstance(stdin, int):
        return stdin
    try:
        return stdin.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _in_background(fd: int) -> bool:
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False    # not our controlling terminal: no job control applies
