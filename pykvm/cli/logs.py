"""What the library logs, as the `pykvm` command shows it: one clean line per record.

Library code reports what happens on its threads (a gdb client refused, a device that
needs a reset, devices that failed to close) through the ``logging`` module, under the
``pykvm`` logger and its children (``pykvm.gdb``, ...), and never prints. The command
installs :class:`LineHandler` on that logger: each record becomes ``pykvm: MESSAGE``
on stderr, its first line only, and an exception attached to it (``log.exception``)
adds its type and first line instead of a traceback, as a PykvmError reaching
:func:`pykvm.cli.main` does. Warnings and errors are shown; with ``PYKVM_DEBUG`` set,
everything down to debug records, and tracebacks in full.

A program that embeds pykvm configures ``logging`` itself; nothing here runs then.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import first_line

LOGGER = "pykvm"


class LineHandler(logging.Handler):
    """Writes each record as one line to the stderr of the moment (a test's capture, or
    a stream the command swapped in, is honoured)."""

    def __init__(self, debug: bool = False):
        super().__init__(logging.DEBUG if debug else logging.WARNING)
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        line = first_line(record.getMessage()) if record.msg else ""
        if record.exc_info and record.exc_info[1] is not None:
            if self.debug:
                return f"pykvm: {super().format(record)}"
            error = record.exc_info[1]
            line = f"{line}: " if line else ""
            line += f"{type(error).__name__}: {first_line(error)}"
        return f"pykvm: {line}"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:       # a closed stderr must not take a vCPU thread down
            self.handleError(record)


def install(debug: bool | None = None) -> LineHandler:
    """Give the ``pykvm`` logger the command's handler, once per process (``main`` may run
    more than once in one process: tests, bench/startup.py)."""
    if debug is None:
        debug = bool(os.environ.get("PYKVM_DEBUG"))
    logger = logging.getLogger(LOGGER)
    for handler in logger.handlers:
        if isinstance(handler, LineHandler):
            handler.debug = debug
            handler.setLevel(logging.DEBUG if debug else logging.WARNING)
            break
    else:
        handler = LineHandler(debug)
        logger.addHandler(handler)
    if debug:       # otherwise the logger keeps its level (the root's WARNING by default)
        logger.setLevel(logging.DEBUG)
    return handler
