"""The MMDS data store and V2's session tokens (Firecracker docs/mmds/mmds-user-guide.md:
"Inserting and updating metadata", "MMDS formats", "Version 2").

The store holds one JSON object. PUT replaces it; PATCH applies an RFC 7396 JSON merge
patch (a null removes a key, an object merges, anything else replaces); either is
refused whole when the result, serialized compactly, is larger than the size limit
(Firecracker's ``--mmds-size-limit``, 51200 bytes by default), so a host client
cannot make pykvm hold more. Until the first PUT the store is "not initialized".

The guest reads it by JSON pointer (the request path, RFC 6901): as JSON (``Accept:
application/json``) or in IMDS form: an object is its keys one a line, an object
member's key with a trailing "/", a string is itself, anything else cannot be shown
in IMDS form (Firecracker answers 501).

Thread-safe: the API thread writes while a NIC's worker reads.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

DEFAULT_SIZE_LIMIT = 51200            # Firecracker's --mmds-size-limit default
MAX_TOKENS = 64                       # V2 session tokens alive at once (the oldest go)
MIN_TTL, MAX_TTL = 1, 21600           # X-metadata-token-ttl-seconds bounds (6 hours)
MAX_DEPTH = 64                        # JSON nesting a patch may have (RFC 7396 recursion)

NOT_INITIALIZED = "The MMDS data store is not initialized."
NOT_AN_OBJECT = "The MMDS data store request body must be a JSON object."


class StoreError(Exception):
    """A store operation refused; ``str()`` is Firecracker's fault message."""


class NotFound(StoreError):
    pass


class NotInitialized(StoreError):
    pass


class Unsupported(StoreError):
    """The value cannot be shown in IMDS form (Firecracker: 501)."""


def merge_patch(target, patch, depth: int = 0):
    """RFC 7396 section 2: the result of applying ``patch`` to ``target`` (new objects;
    neither argument is changed)."""
    if depth > MAX_DEPTH:
        raise StoreError("The MMDS patch is nested too deeply.")
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, depth + 1)
    return result


def serialized_size(value) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def imds_text(value) -> str:
    """The IMDS form: an object's keys (objects with "/"), a string itself."""
    if isinstance(value, dict):
        return "\n".join(f"{key}/" if isinstance(item, dict) else key
                         for key, item in value.items())
    if isinstance(value, str):
        return value
    raise Unsupported("Cannot retrieve value. The value has an unsupported type.")


class MetadataStore:
    def __init__(self, size_limit: int = DEFAULT_SIZE_LIMIT):
        self.size_limit = size_limit
        self._value: dict | None = None
        self._lock = threading.Lock()

    @property
    def initialized(self) -> bool:
        return self._value is not None

    def _check(self, value) -> None:
        if not isinstance(value, dict):
            raise StoreError(NOT_AN_OBJECT)
        size = serialized_size(value)
        if size > self.size_limit:
            raise StoreError(f"The MMDS data store size limit was exceeded: {size} bytes > "
                             f"{self.size_limit} bytes")

    def put(self, value) -> None:
        self._check(value)
        with self._lock:
            self._value = value

    def patch(self, patch) -> None:
        if not isinstance(patch, dict):
            raise StoreError(NOT_AN_OBJECT)
        with self._lock:
            if self._value is None:
                raise NotInitialized(NOT_INITIALIZED)
            patched = merge_patch(self._value, patch)
            self._check(patched)
            self._value = patched

    def get(self):
        """The whole store (GET /mmds): {} before the first PUT, as Firecracker shows it."""
        with self._lock:
            return {} if self._value is None else self._value

    def lookup(self, path: str):
        """The value at ``path``, a JSON pointer (a trailing "/" is ignored, "~1" and
        "~0" are RFC 6901's escapes); NotFound/NotInitialized."""
        with self._lock:
            value = self._value
        if value is None:
            raise NotInitialized(NOT_INITIALIZED)
        path = path[:-1] if path.endswith("/") else path
        if path and not path.startswith("/"):
            raise NotFound("The MMDS resource does not exist.")
        for token in path.split("/")[1:] if path else ():
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(value, dict) and token in value:
                value = value[token]
            elif isinstance(value, list) and token.isdigit() and len(token) < 10 and \
                    (token == "0" or not token.startswith("0")) and int(token) < len(value):
                value = value[int(token)]
            else:
                raise NotFound("The MMDS resource does not exist.")
        return value


@dataclass
class Token:
    value: str
    expires: float


class TokenAuthority:
    """V2's session tokens: PUT /latest/api/token makes one that lives ``ttl`` seconds;
    a GET must carry a live one. At most MAX_TOKENS are kept (a guest asking for more
    loses its oldest): a guest cannot make pykvm hold unbounded state."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._tokens: list[Token] = []
        self._lock = threading.Lock()

    def generate(self, ttl: int) -> str:
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"Invalid time to live value provided for token: {ttl}. "
                             f"Please provide a value between {MIN_TTL} and {MAX_TTL}.")
        token = Token(os.urandom(32).hex(), self._clock() + ttl)
        with self._lock:
            self._expire()
            self._tokens.append(token)
            del self._tokens[:-MAX_TOKENS]
        return token.value

    def valid(self, value: str | None) -> bool:
        if not value:
            return False
        with self._lock:
            self._expire()
            return any(_same(token.value, value) for token in self._tokens)

    def _expire(self) -> None:
        now = self._clock()
        self._tokens = [token for token in self._tokens if token.expires > now]


def _same(a: str, b: str) -> bool:
    # hmac is imported at the top: this runs on a NIC's worker thread, whose seccomp
    # filter (pykvm/sandbox) refuses the open() a first import needs.
    return hmac.compare_digest(a.encode(), b.encode("utf-8", "replace"))
