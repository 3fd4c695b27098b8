"""What pykvm logged during a test: the messages pytest's ``caplog`` holds from the
``pykvm`` logger and its children (device transports warn there when a guest breaks
the rules: "NAME: WHY; device needs reset", once per failure until a reset)."""

from __future__ import annotations

import logging


def pykvm_warnings(caplog, logger: str = "pykvm") -> list[str]:
    """The messages of WARNING or above that ``logger`` or its children recorded."""
    return [record.getMessage() for record in caplog.records
            if record.levelno >= logging.WARNING
            and (record.name == logger or record.name.startswith(logger + "."))]
