"""The HTTP/1.1 the server speaks besides WebSocket frames: request heads in, short replies out.

Every connection's first bytes are read here (`HeadReader`), whatever they turn out to be, so that every request
gets a status line naming its problem: websockets' own handshake parser takes only a `GET` without a body and
closes the connection without a word on anything else. The checks are at least as strict as that parser's (the
same line and header limits and header grammar, CRLF line ends), so a head handed on to websockets as a WebSocket
handshake always parses there too.
"""

from __future__ import annotations

import email.utils
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import SERVER, Response

MAX_LINE = 8192  # bytes in the request line or a header line, as websockets (and most HTTP servers)
MAX_HEADERS = 128
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")  # a header name (RFC 9110 5.1)
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # a header value, without obsolete line folding
_LENGTH = re.compile(r"0|[1-9][0-9]*")  # websockets' parser takes "0" but no other spelling of zero


class Refusal(Exception):
    """A request answered with `status` and this message, never handed on."""

    def __init__(self, status: HTTPStatus, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with its query, as sent
    headers: Headers
    body: bytes | None  # None: a GET without a body (a WebSocket handshake if no HTTP route takes it)

    @property
    def route(self) -> str:
        return self.path.split("?", 1)[0]


def text(status: HTTPStatus, why: str, allow: str | None = None) -> Response:
    """A plain-text reply; `allow`: the `Allow` header of a 405."""
    return _reply(status, (why + "\n").encode(), "text/plain; charset=utf-8", allow)


def json_reply(status: HTTPStatus, body: bytes | dict[str, Any]) -> Response:
    """`body`: JSON bytes, or a dict of plain values to encode."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _reply(status, data, "application/json")


def _reply(status: HTTPStatus, body: bytes, content_type: str, allow: str | None = None) -> Response:
    """The headers websockets gives its own replies (one request per connection: `Connection: close`)."""
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
        ]
    )
    if allow is not None:
        headers["Allow"] = allow
    headers["Server"] = SERVER
    return Response(status.value, status.phrase, headers, body)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HeadReader:
    """Reads one request head from the bytes fed to it. Lines are checked as they complete, so a line over the
    limit is refused as soon as it is, and no byte is scanned twice."""

    def __init__(self) -> None:
        self.buffer = bytearray()  # everything fed so far; what follows the head stays here
        self.end = 0  # bytes of the head checked so far; its length once `feed` has returned it
        self._lines: list[bytes] = []

    def feed(self, data: bytes) -> tuple[str, str, Headers] | None:
        """Add `data`; the head's method, path and headers once it is complete, else None. Raises `Refusal`."""
        self.buffer += data
        while True:
            newline = self.buffer.find(b"\n", self.end)
            size = (newline + 1 if newline >= 0 else len(self.buffer)) - self.end
            if size > MAX_LINE:
                if self._lines:
                    raise Refusal(
                        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                        f"headers too large: a line over {MAX_LINE} bytes",
                    )
                raise Refusal(
                    HTTPStatus.REQUEST_URI_TOO_LONG, f"request line too long: over {MAX_LINE} bytes"
                )
            if newline < 0:
                return None
            line = bytes(self.buffer[self.end : newline + 1])
            self.end = newline + 1
            if not line.endswith(b"\r\n"):
                raise _malformed("line without CRLF")
            if line == b"\r\n" and self._lines:
                return _head(self._lines)
            self._lines.append(line[:-2])
            if len(self._lines) > MAX_HEADERS + 1:
                raise Refusal(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"headers too large: over {MAX_HEADERS} headers",
                )


def _malformed(why: str) -> Refusal:
    return Refusal(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {why}")


def _head(lines: list[bytes]) -> tuple[str, str, Headers]:
    parts = lines[0].split(b" ", 2)
    if len(parts) != 3:
        raise _malformed(f"invalid request line {lines[0][:100]!r}")
    method, path, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refusal(HTTPStatus.BAD_REQUEST, f"expected HTTP/1.1 or HTTP/1.0, got {version[:100]!r}")
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon:
            raise _malformed(f"invalid HTTP header line: {line[:100]!r}")
        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise _malformed(f"invalid HTTP header {line[:100]!r}")
        headers[name.decode()] = value.decode("iso-8859-1")  # opaque bytes as websockets keeps them
    try:  # a URI is ASCII (RFC 3986)
        return method.decode("ascii"), path.decode("ascii"), headers
    except UnicodeDecodeError:
        raise _malformed(f"non-ASCII method or path {lines[0][:100]!r}") from None


def body_length(headers: Headers) -> int:
    """The request body's length from `Content-Length` (none: 0); chunked bodies are refused."""
    if "Transfer-Encoding" in headers:
        raise Refusal(HTTPStatus.BAD_REQUEST, "chunked bodies are not supported; send Content-Length")
    declared = headers.get_all("Content-Length")
    if len(declared) > 1 or not all(_LENGTH.fullmatch(n) for n in declared):
        raise Refusal(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {declared}")
    return int(declared[0]) if declared else 0
