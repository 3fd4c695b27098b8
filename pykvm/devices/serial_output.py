"""Guest console output on its way to the host, batched.

A UART (pykvm/devices/serial.py) hands over one byte per guest port write; a
host system call per byte would dominate a chatty guest's boot. BufferedOutput
gathers bytes until a newline, a size, or a short delay, and writes them in one
go to a binary stream or a callable; host-side write errors are counted, never
raised into the guest's exit.
"""

from __future__ import annotations

import io
import threading
from typing import BinaryIO, Callable


Output = BinaryIO | Callable[[bytes], object]


class BufferedOutput:
    """Guest bytes on their way to a host stream or callable, in batches.

    A Linux guest writes its console one byte per port exit. Writing each byte
    through to the host would add a system call per byte, so bytes are kept
    until a newline, until ``max_buffer`` bytes have gathered, or until
    ``flush_delay`` seconds after the first unflushed byte (a prompt without a
    newline must still appear): a small daemon thread, started on first use,
    does the last. ``flush_delay=None`` disables it (flush() then does).

    Host-side write errors (a closed pipe, a full disk) are counted in
    :attr:`errors` and the bytes dropped: the guest must not crash the VMM by
    printing.
    """

    def __init__(self, output: Output, *, max_buffer: int = 4096,
                 flush_delay: float | None = 0.02):
        self._emit = _writer_for(output)
        self._max_buffer = max_buffer
        self._flush_delay = flush_delay
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        # Held while bytes go out, so two flushers cannot reorder output.
        self._emit_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._closed = False
        self.errors = 0

    def write_byte(self, value: int) -> None:
        with self._lock:
            was_empty = not self._buffer
            self._buffer.append(value)
            must_flush = value == 0x0A or len(self._buffer) >= self._max_buffer
            if was_empty and not must_flush and self._flush_delay is not None:
                self._arm_flusher()
        if must_flush:
            self.flush()

    def flush(self) -> None:
        with self._emit_lock:
            with self._lock:
                data = bytes(self._buffer)
                self._buffer.clear()
            if data:
                try:
                    self._emit(data)
                except (OSError, ValueError):   # ValueError: the stream was closed
                    self.errors += 1

    def close(self) -> None:
        """Flush and stop the flusher thread. Later bytes are still accepted."""
        with self._lock:
            self._closed = True
            self._flush_delay = None
            self._wakeup.notify()
            flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join()
        self.flush()

    def _arm_flusher(self) -> None:
        # Called with self._lock held, when the buffer has just become non-empty.
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_when_idle,
                                             name="serial-output", daemon=True)
            self._flusher.start()
        else:
            self._wakeup.notify()

    def _flush_when_idle(self) -> None:
        while True:
            with self._lock:
                while not self._buffer and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return
                # Give the guest flush_delay to add more before the syscall.
                self._wakeup.wait(self._flush_delay)
                if self._closed:
                    return
            self.flush()


def _writer_for(output: Output) -> Callable[[bytes], object]:
    if isinstance(output, io.RawIOBase):
        raw = output

        def write_raw(data: bytes) -> None:
            # An unbuffered stream may take part of the data per call.
            view = memoryview(data)
            while view:
                written = raw.write(view)
                if written is None:     # non-blocking and full
                    raise BlockingIOError("output stream would block")
                view = view[written:]
        return write_raw
    if hasattr(output, "write"):
        stream = output
        flush = getattr(stream, "flush", None)

        def write(data: bytes) -> None:
            stream.write(data)      # buffered streams and file-likes take it all
            if flush is not None:
                flush()
        return write
    if callable(output):
        return output
    raise TypeError(f"serial output must be a binary stream or a callable, not {output!r}")
