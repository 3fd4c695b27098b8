"""Binary data in state.json: base64 text (RFC 4648, with padding, checked)."""

from __future__ import annotations

import base64


def b64(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def unb64(text: str, size: int | None = None) -> bytes:
    """Decode base64 text; with ``size``, insist on exactly that many bytes."""
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {type(text).__name__}")
    data = base64.b64decode(text.encode("ascii"), validate=True)
    if size is not None and len(data) != size:
        raise ValueError(f"expected {size} bytes, got {len(data)}")
    return data
