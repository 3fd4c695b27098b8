"""The guest's side of MMDS: HTTP/1.1 requests to the metadata address and their
responses (Firecracker docs/mmds/mmds-user-guide.md, "Retrieving metadata in the guest
operating system" and "Errors").

- ``GET <json pointer>``: the value there, as JSON with ``Accept: application/json``,
  else in IMDS form (store.py). 404 for a missing resource (also before the first
  PUT /mmds), 501 for a value IMDS cannot show.
- ``PUT /latest/api/token`` with ``X-metadata-token-ttl-seconds`` (or the
  ``X-aws-ec2-metadata-token-ttl-seconds`` spelling), 1 to 21600: a session token,
  as plain text. A request with ``X-Forwarded-For`` is refused (a token must not be
  fetched through a proxy).
- V2: a GET must carry a live token in ``X-metadata-token`` (or
  ``X-aws-ec2-metadata-token``): 401 otherwise. V1 serves a GET without one.
- Any other method: 405 with ``Allow: GET, PUT``.

A request is bounded (MAX_REQUEST bytes, headers and body); anything malformed is a
400. Every response says ``Connection: close``: the stack closes the connection after
it, so a connection holds at most one request's state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .store import (MetadataStore, NotFound, NotInitialized, TokenAuthority, Unsupported,
                    imds_text)

MAX_REQUEST = 8192
MAX_HEADERS = 64
TOKEN_PATH = "/latest/api/token"
TTL_HEADERS = ("x-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token-ttl-seconds")
TOKEN_HEADERS = ("x-metadata-token", "x-aws-ec2-metadata-token")
V1, V2 = "V1", "V2"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large", 501: "Not Implemented"}


class RequestTooLarge(Exception):
    pass


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


def parse(buffer: bytes) -> tuple[Request | None, int]:
    """(the request, bytes it took) once ``buffer`` holds a whole one, (None, 0) while
    it does not; ValueError for a malformed one, RequestTooLarge past MAX_REQUEST."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_REQUEST:
            raise RequestTooLarge()
        return None, 0
    head = buffer[:end].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise ValueError("Invalid request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise ValueError("Too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("Invalid header")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise ValueError("Transfer-Encoding is not supported")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or len(length_text) > 6:
        raise ValueError("Invalid Content-Length")
    total = end + 4 + int(length_text)
    if total > MAX_REQUEST:
        raise RequestTooLarge()
    if len(buffer) < total:
        return None, 0
    return Request(parts[0], parts[1].split("?", 1)[0], headers), total


def response(status: int, body: str = "", content_type: str = "text/plain",
             extra: str = "") -> bytes:
    data = body.encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: pykvm MMDS\r\n"
            f"Connection: close\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


class MmdsService:
    """Answers guest requests from ``store``; ``version`` V1 or V2 (tokens from
    ``tokens``); ``imds_only`` (Firecracker's ``imds_compat``): IMDS form whatever
    the Accept header says."""

    def __init__(self, store: MetadataStore, version: str = V1,
                 tokens: TokenAuthority | None = None, *, imds_only: bool = False):
        self.store = store
        self.version = version
        self.tokens = tokens or TokenAuthority()
        self.imds_only = imds_only      # Firecracker's imds_compat: never JSON

    def answer(self, buffer: bytes) -> tuple[bytes | None, int]:
        """(the response, bytes consumed) for the request at the start of ``buffer``,
        (None, 0) while it is incomplete."""
        try:
            request, used = parse(buffer)
        except RequestTooLarge:
            return response(413, "Request too large."), len(buffer)
        except ValueError as error:
            return response(400, f"{error}."), len(buffer)
        if request is None:
            return None, 0
        return self.respond(request), used

    def respond(self, request: Request) -> bytes:
        if request.method == "PUT":
            return self._put(request)
        if request.method != "GET":
            return response(405, "Not allowed HTTP method.", extra="Allow: GET, PUT\r\n")
        token = next((request.headers[h] for h in TOKEN_HEADERS if h in request.headers), None)
        if self.version == V2:
            if token is None:
                return response(401, "No MMDS token provided. Use `X-metadata-token` header "
                                     "to specify the session token.")
            if not self.tokens.valid(token):
                return response(401, "MMDS token not valid.")
        try:
            value = self.store.lookup(request.path)
            if "application/json" in request.headers.get("accept", "") and \
                    not self.imds_only:
                return response(200, json.dumps(value, separators=(",", ":")),
                                "application/json")
            return response(200, imds_text(value))
        except (NotFound, NotInitialized):
            return response(404, f"Resource not found: {request.path[:200]}.")
        except Unsupported as error:
            return response(501, str(error))

    def _put(self, request: Request) -> bytes:
        if request.path.rstrip("/") != TOKEN_PATH:
            return response(404, f"Resource not found: {request.path[:200]}.")
        if "x-forwarded-for" in request.headers:
            return response(400, "Invalid header. Reason: Unsupported header name. "
                                 "Key: X-Forwarded-For")
        ttl = next((request.headers[h] for h in TTL_HEADERS if h in request.headers), None)
        if ttl is None:
            return response(400, "Token time to live value not found. Use "
                                 "`X-metadata-token-ttl-seconds` header to specify the "
                                 "token's lifetime.")
        if not ttl.isdigit() or len(ttl) > 9:
            return response(400, f"Invalid value. Key: X-metadata-token-ttl-seconds; "
                                 f"Value: {ttl[:40]}")
        try:
            return response(200, self.tokens.generate(int(ttl)))
        except ValueError as error:
            return response(400, str(error))
