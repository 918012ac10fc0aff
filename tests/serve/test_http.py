"""The server's own HTTP request reader: limits, refusals, and heads that websockets then parses the same way."""

from __future__ import annotations

import random
from http import HTTPStatus

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol

from xvla.serve import http

HEAD = b"POST /act?x=1 HTTP/1.1\r\nHost: robot\r\nContent-Length: 2\r\nX-Opaque: caf\xe9\r\n\r\n{}"


def test_a_head_fed_byte_by_byte_is_read_once_complete() -> None:
    reader = http.HeadReader()
    for i in range(HEAD.index(b"\r\n\r\n") + 3):
        assert reader.feed(HEAD[i : i + 1]) is None
    method, path, headers = reader.feed(HEAD[-3:-2])  # type: ignore[misc]
    assert (method, path, headers["Host"], headers["X-Opaque"]) == ("POST", "/act?x=1", "robot", "café")
    assert http.body_length(headers) == 2 and reader.end == len(HEAD) - 2
    reader.feed(HEAD[-2:])
    assert reader.buffer[reader.end :] == b"{}"  # the body stays for the connection to read


@pytest.mark.parametrize(
    ("data", "status", "needle"),
    [
        (b"GET /" + b"a" * 9000, HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long"),  # before its end
        (
            b"GET / HTTP/1.1\r\nX: " + b"a" * 9000,
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers too large",
        ),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 129, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "over 128"),
        (b"GET / HTTP/1.1\nHost: x\n\n", HTTPStatus.BAD_REQUEST, "line without CRLF"),
        (b"GET /\r\n\r\n", HTTPStatus.BAD_REQUEST, "invalid request line"),
        (b"GET / HTTP/2.0\r\n\r\n", HTTPStatus.BAD_REQUEST, "expected HTTP/1.1 or HTTP/1.0"),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", HTTPStatus.BAD_REQUEST, "invalid HTTP header line"),
        (b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n", HTTPStatus.BAD_REQUEST, "invalid HTTP header"),
        (b"GET /\xff HTTP/1.1\r\n\r\n", HTTPStatus.BAD_REQUEST, "non-ASCII"),
    ],
)
def test_bad_heads_are_refused_by_name(data: bytes, status: HTTPStatus, needle: str) -> None:
    with pytest.raises(http.Refusal, match=needle) as refused:
        http.HeadReader().feed(data)
    assert refused.value.status == status


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ([("Transfer-Encoding", "chunked")], "chunked bodies are not supported"),
        ([("Content-Length", "1_0")], "invalid Content-Length"),
        ([("Content-Length", "00")], "invalid Content-Length"),  # websockets' parser would refuse it silently
        ([("Content-Length", "2"), ("Content-Length", "2")], "invalid Content-Length"),
    ],
)
def test_bodies_need_one_plain_content_length(headers: list[tuple[str, str]], needle: str) -> None:
    with pytest.raises(http.Refusal, match=needle):
        http.body_length(Headers(headers))


def test_replies_look_like_websockets_own() -> None:
    reply = http.text(HTTPStatus.METHOD_NOT_ALLOWED, "no", allow="POST").serialize()
    assert reply.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and reply.endswith(b"\r\n\r\nno\n")
    for header in (b"Connection: close", b"Content-Length: 3", b"Allow: POST", b"text/plain; charset=utf-8"):
        assert header in reply
    assert b"Content-Type: application/json" in http.json_reply(HTTPStatus.OK, {"a": 1}).serialize()


def _heads(n: int, seed: int = 0) -> list[bytes]:
    """Request heads near the edge of what parses: mostly well-formed pieces, now and then an odd one."""
    rng = random.Random(seed)
    methods = [b"GET"] * 6 + [b"POST", b"G\xc3\xa9T"]
    paths = [b"/", b"/act?x=1", b"/%7E", b"/a b", b"/\xff", b"/\x00"]
    versions = [b"HTTP/1.1"] * 5 + [b"HTTP/1.0", b"HTTP/1.1 ", b"http/1.1"]
    lines = [
        b"Host: x",
        b"Upgrade: websocket",
        b"Content-Length: 0",
        b"X-a:",
        b"X-a:\t y \t",
        b"X-a: caf\xe9",
    ]
    odd = [b"Content-Length: 00", b"bad name: x", b"X: a\x01b", b"X: a\rb", b": x", b"no colon", b" X: y"]
    heads = []
    for _ in range(n):
        headers = [rng.choice(lines if rng.random() < 0.85 else odd) for _ in range(rng.randrange(5))]
        request_line = rng.choice(methods) + b" " + rng.choice(paths) + b" " + rng.choice(versions)
        heads.append(b"\r\n".join([request_line, *headers]) + b"\r\n\r\n")
    return heads


def test_a_get_handed_to_websockets_parses_there_too() -> None:
    """What the reader passes on as a WebSocket handshake (a GET without a body) never makes websockets' own
    parser fail, which would close the connection without a word."""
    handed_on = 0
    for data in _heads(2000):
        try:
            method, _, headers = http.HeadReader().feed(data)  # type: ignore[misc]
            if method != "GET" or http.body_length(headers) != 0:
                continue
        except http.Refusal:
            continue
        protocol = ServerProtocol()
        protocol.receive_data(data)
        assert protocol.handshake_exc is None, (data, protocol.handshake_exc)
        assert isinstance(protocol.events_received()[0], Request)
        handed_on += 1
    assert handed_on > 200
