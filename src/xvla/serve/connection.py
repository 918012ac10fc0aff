"""One TCP connection of the policy server, from the accept: an HTTP request answered here, or a WebSocket.

`websockets.asyncio.server.serve` builds every connection through its `create_connection` hook; this subclass of
its `ServerConnection` sees the bytes first. It reads the request head (`http.HeadReader`) and any body itself,
and hands the request to the server's `respond`, which answers it, or returns None for a WebSocket handshake: only
then are the head's bytes fed to websockets, which parses them and runs the handshake and the connection as it
always does. An HTTP request never reaches websockets' parser, so nothing of websockets is replaced or patched.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import CloseCode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from xvla.serve import http
from xvla.serve.limits import Limits

logger = logging.getLogger(__name__)


class App(Protocol):
    async def respond(self, request: http.Request) -> Response | None:
        """The reply to `request`; None (only for a GET without a body): open a WebSocket."""
        ...


class Connection(ServerConnection):
    def __init__(
        self, protocol: ServerProtocol, *args: Any, app: App, limits: Limits, max_body: int, **kwargs: Any
    ) -> None:
        super().__init__(protocol, *args, **kwargs)
        self.app = app
        self.limits = limits
        self.max_body = max_body
        self.reserved = 0  # bytes of this connection's body counted in `limits` (released when it closes)
        self._reader: http.HeadReader | None = http.HeadReader()  # None once the request is complete
        self._head: tuple[str, str, Headers] | None = None
        self._length: int | None = None  # the body's; None: a GET without one
        self._task: asyncio.Task[None] | None = None
        # websockets reads from here on: the head went to it as a WebSocket handshake, or it sent a reply and
        # discards whatever the client still sends
        self._passthrough = False
        self._held = b""  # bytes that came after the handshake request, parsed once the handshake is done
        self._frames: FrameLengths | None = (
            None  # once the WebSocket is open: counts its frames as they arrive
        )
        self.ws_reserved = 0  # bytes of this WebSocket's messages counted in `limits` and not yet released

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.limits.opened()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._task is not None:
            self._task.cancel()  # the client left (or open_timeout passed): nobody reads the reply
        self.limits.release(self.reserved + self.ws_reserved)
        self.reserved = self.ws_reserved = 0
        self.limits.closed()

    def data_received(self, data: bytes) -> None:
        if self._frames is not None:
            self._feed_frames(self._frames, data)
        elif self._passthrough:
            super().data_received(data)
        elif self._reader is not None:
            self._read(self._reader, data)
        # else the request is complete and reading paused until its reply

    # asyncio.Protocol.eof_received returns bool | None (True keeps the transport open for the reply);
    # websockets narrows its own override to None, which does not bind this subclass.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        if self._reader is not None:
            self._finish(
                http.text(HTTPStatus.BAD_REQUEST, "malformed HTTP request: it ends before it is complete")
            )
        if self._passthrough:
            return super().eof_received()
        return True  # keep the transport open for the reply

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        await super().handshake(*args, **kwargs)
        if self.state is State.OPEN:
            # Parsed before the 101, bad framing would close the connection while the handshake is pending (and
            # answering it would then fail inside websockets); now frames that came early are parsed at once.
            self.transport.resume_reading()
            self._frames = FrameLengths()
            held, self._held = self._held, b""
            if held:
                self._feed_frames(self._frames, held)

    def release_message(self, n: int) -> None:
        """The handler is done with a message of `n` bytes (counted when its frames' headers arrived)."""
        n = min(n, self.ws_reserved)
        self.ws_reserved -= n
        self.limits.release(n)

    def _feed_frames(self, frames: FrameLengths, data: bytes) -> None:
        """Count each data frame's payload in `limits` as soon as its header arrives, before websockets buffers
        it: a message websockets is still reading or has queued is held memory too. A frame over the cap closes
        the connection with 1013 before its payload is read; one over max_size is websockets' to refuse (1009)."""
        for n in frames.feed(data):
            if n > self.max_body:
                continue
            if not self.limits.reserve(n):
                self._frames = None
                self.protocol.fail(CloseCode.TRY_AGAIN_LATER, self.limits.busy_bytes(n)[:120])
                self.send_data()
                return
            self.ws_reserved += n
        super().data_received(data)

    def _read(self, reader: http.HeadReader, data: bytes) -> None:
        try:
            if self._head is None:
                if not reader.buffer and (busy := self.limits.busy_connections()) is not None:
                    raise http.Refusal(HTTPStatus.SERVICE_UNAVAILABLE, busy)
                self._head = reader.feed(data)
                if self._head is None:
                    return
                self._length = self._body_length(self._head[0], self._head[2])
            else:
                reader.buffer += data
        except http.Refusal as refusal:
            self._finish(http.text(refusal.status, str(refusal)))
            return
        body_end = reader.end + (self._length or 0)
        if len(reader.buffer) < body_end:
            return
        # The request is complete: reading pauses until it is answered (until the WebSocket is open, if it is).
        self.transport.pause_reading()
        self._reader = None
        with memoryview(reader.buffer) as view:
            head = bytes(view[: reader.end])
            body = None if self._length is None else bytes(view[reader.end : body_end])
            if body is None:
                self._held = bytes(view[reader.end :])
        self._task = self.loop.create_task(self._respond(http.Request(*self._head, body), head))

    def _body_length(self, method: str, headers: Headers) -> int | None:
        length = http.body_length(headers)
        if method == "GET" and length == 0:
            return None
        if length > self.max_body:
            raise http.Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request body of {length} bytes exceeds the limit of {self.max_body} bytes",
            )
        if not self.limits.reserve(length):  # refused before a byte of the body is read
            raise http.Refusal(HTTPStatus.SERVICE_UNAVAILABLE, self.limits.busy_bytes(length))
        self.reserved = length
        if headers.get("Expect", "").lower() == "100-continue":  # curl asks before sending a large body
            self.transport.write(http.CONTINUE)
        return length

    async def _respond(self, request: http.Request, head: bytes) -> None:
        try:
            reply = await self.app.respond(request)
        except Exception:
            logger.exception("request failed")
            reply = http.text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal server error; see the server's log")
        if reply is not None:
            self._finish(reply)
            return
        assert request.body is None
        self._passthrough = True
        super().data_received(head)  # websockets parses the handshake request and answers it

    def _finish(self, reply: Response) -> None:
        """Send `reply` through websockets' protocol (its public `send_response`), which then knows the connection
        is answered: as after its own refusals it half-closes, discards what the client still sends (the rest of
        a refused body, bytes after a request: one request per connection) and closes at the client's end."""
        self._reader = None
        if self.transport.is_closing():
            return
        self.protocol.send_response(reply)
        self._passthrough = True
        self.send_data()
        self.transport.resume_reading()


class FrameLengths:
    """Follows the frame headers of a client's WebSocket byte stream (RFC 6455 5.2): `feed` returns the payload
    lengths of the data frames (text, binary, continuation) whose headers complete in the bytes fed."""

    def __init__(self) -> None:
        self._head = bytearray()  # a header being read
        self._skip = 0  # payload bytes of the current frame still to pass

    def feed(self, data: bytes) -> list[int]:
        lengths: list[int] = []
        i = 0
        while i < len(data):
            if self._skip:
                step = min(self._skip, len(data) - i)
                self._skip -= step
                i += step
                continue
            self._head.append(data[i])
            i += 1
            size = _header_size(self._head)
            if size is None or len(self._head) < size:
                continue
            opcode, n = self._head[0] & 0x0F, self._head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(self._head[2:4], "big")
            elif n == 127:
                n = int.from_bytes(self._head[2:10], "big")
            self._head.clear()
            self._skip = n
            if opcode < 8:
                lengths.append(n)
        return lengths


def _header_size(head: bytearray) -> int | None:
    """A frame header's size once its first two bytes are known (None before)."""
    if len(head) < 2:
        return None
    n = head[1] & 0x7F
    extended = 2 if n == 126 else 8 if n == 127 else 0
    mask = 4 if head[1] & 0x80 else 0
    return 2 + extended + mask
