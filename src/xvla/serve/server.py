"""Policy server: WebSocket (openpi protocol) and HTTP (`GET /healthz`, `POST /act`) on one port.

One asyncio event loop (the `websockets` server) owns the sockets. Every connection first reads its request as
HTTP (`connection.Connection`): `respond` answers the HTTP routes and every refusal, and a WebSocket handshake goes
on to websockets, then to `_handle_ws`. Both transports answer requests through their format's codec
(`xvla.serve.codecs`). Model work runs in a single worker thread fed by a dynamic batcher, so the loop keeps
answering pings, health checks and malformed requests while the model computes. Concurrent requests that arrive
within `max_wait_ms` of each other share one forward pass (up to `max_batch`); a request that makes its batch
fail is retried alone, so it fails by itself.

WebSocket protocol (wire-compatible with `openpi_client.websocket_client_policy.WebsocketClientPolicy`):
on connect the server sends the policy metadata (msgpack); each binary msgpack observation is answered with a
msgpack dict holding `actions` and `server_timing`; a message ``{"execution": {"strategy": ...}}`` selects the
connection's execution strategy (`xvla.serve.execution`; answered with ``{"execution": {...}}``) and starts a
fresh per-connection `Session`, freed when the connection closes; a bad request is answered with a text frame naming the
problem and the connection stays open. A message over the size limit closes that connection with code 1009
and a reason naming the size (the frame is never read into memory); the server keeps serving.

A request with an `Origin` header (a browser) is refused with 403 unless it comes from a loopback page, the
bound host or `ServerConfig.allow_origins`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from xvla.serve import http
from xvla.serve.codecs import ACT, Codec
from xvla.serve.connection import Connection
from xvla.serve.execution import strategy_from_dict, strategy_to_dict
from xvla.serve.limits import Limits
from xvla.serve.protocol import RequestError, packb
from xvla.serve.session import Session

logger = logging.getLogger(__name__)


class ServablePolicy(Protocol):
    """What the server needs from a policy (`xvla.serve.policy.Policy` implements it)."""

    codec: Codec  # the format of WebSocket requests

    @property
    def metadata(self) -> dict[str, Any]: ...  # read only (Policy computes it)

    def prepare(
        self, obs: Mapping[str, Any], *, codec: Codec
    ) -> Any: ...  # validates + transforms; raises RequestError

    def run(self, prepared: list[Any]) -> list[dict[str, Any]]: ...  # one batched forward pass


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8010  # 0 picks a free port
    api_key: str | None = None  # clients send `Authorization: Api-Key <key>`
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_message_mb: float = 16.0
    open_timeout_s: float = 30.0  # a connection until it is a WebSocket: covers a POST /act's inference
    # Browser origins allowed besides loopback pages and the bound host ("*": any). A browser attaches
    # `Origin` to every WebSocket and cross-site POST: without this check any web page the robot's operator
    # opens could drive an unauthenticated server on localhost.
    allow_origins: tuple[str, ...] = ()
    # Caps on what clients can make the server hold: open connections (HTTP and WebSocket, counted from the
    # TCP accept, so clients that never finish a request count too), and bytes of request bodies and
    # WebSocket messages being answered. Over either cap a request is refused with 503 / close code 1013.
    max_connections: int = 64
    max_buffered_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: empty (None serves without a key)")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_message_mb <= 0:
            raise ValueError(f"max_message_mb must be > 0, got {self.max_message_mb}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_buffered_mb < self.max_message_mb:
            raise ValueError(
                f"max_buffered_mb ({self.max_buffered_mb}) must be >= max_message_mb ({self.max_message_mb}): "
                "otherwise a message of the largest allowed size could never be served"
            )

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    @property
    def max_buffered_bytes(self) -> int:
        return int(self.max_buffered_mb * 2**20)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a request carrying `Origin: origin` may be served: a page on a loopback host or on the host
        the server is bound to, or one of `allow_origins`. `null` (a local file, a sandboxed frame) is not."""
        allowed = {o.rstrip("/").lower() for o in self.allow_origins}
        if "*" in allowed or origin.rstrip("/").lower() in allowed:
            return True
        try:
            host = urlsplit(origin).hostname
        except ValueError:
            return False
        if host is None:
            return False
        if host in ("localhost", self.host.lower()):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


# ----------------------------------------------------------------------------------------------------------
# Dynamic batching


@dataclasses.dataclass
class _Job:
    prepared: Any  # validated model inputs (Policy.prepare's result)
    future: asyncio.Future[dict[str, Any]]
    enqueued: float
    prep_ms: float


class Batcher:
    """Validates requests on their own thread (a bad request is answered at once, never queued behind the
    model), then groups valid ones into batches for the single model thread."""

    def __init__(self, policy: ServablePolicy, max_batch: int, max_wait_ms: float) -> None:
        self.policy = policy
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        # One validation thread: fast tokenizers must not be called from two threads at once.
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xvla-prep")
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xvla-infer")

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def submit(self, obs: Any, codec: Codec, session: Session | None = None) -> dict[str, Any]:
        """Validate and queue one request in `codec`'s format; returns the policy's reply plus `server_timing`,
        or raises RequestError naming the problem. With a connection's `session` (an execution strategy), the
        request goes through it on the validation thread before and after the model."""
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        prepared = await loop.run_in_executor(self._prep, self._prepare, obs, codec, session)
        now = time.perf_counter()
        job = _Job(prepared, loop.create_future(), now, (now - start) * 1000.0)
        await self._queue.put(job)
        reply = await job.future
        if session is None:
            return reply
        return await loop.run_in_executor(self._prep, session.finish, prepared, reply)

    def _prepare(self, obs: Any, codec: Codec, session: Session | None) -> Any:
        prepared = self.policy.prepare(obs, codec=codec)
        return prepared if session is None else session.attach(prepared, obs)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = jobs[0].enqueued + self.max_wait_s
            while len(jobs) < self.max_batch:
                if not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            await self._infer(loop, jobs)

    async def _infer(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        """One forward pass for `jobs`, answering their futures. When the batch fails, each request runs again
        alone, so a request that breaks the model fails by itself and never takes other clients' requests with
        it (and a model failure fails requests, never the server)."""
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._model, self._run, [j.prepared for j in jobs])
        except Exception as err:
            if len(jobs) > 1:
                logger.warning(
                    "a batch of %d failed (%s: %s); running its requests one by one",
                    len(jobs),
                    type(err).__name__,
                    err,
                )
                for job in jobs:
                    await self._infer(loop, [job])
                return
            logger.exception("inference failed")
            if not jobs[0].future.done():
                jobs[0].future.set_exception(RuntimeError(f"inference failed: {type(err).__name__}: {err}"))
            return
        infer_ms = (time.perf_counter() - start) * 1000.0
        for job, result in zip(jobs, results, strict=True):
            if job.future.done():  # the client went away
                continue
            timing = {
                "prep_ms": job.prep_ms,
                "queue_ms": (start - job.enqueued) * 1000.0,
                "infer_ms": infer_ms,
                "batch_size": len(jobs),
            }
            job.future.set_result({**result, "server_timing": timing})

    def _run(self, prepared: list[Any]) -> list[dict[str, Any]]:
        results = self.policy.run(prepared)
        if len(results) != len(prepared):
            raise RuntimeError(f"policy returned {len(results)} replies for {len(prepared)} requests")
        return results

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)
        self._model.shutdown(wait=False, cancel_futures=True)


def _method_not_allowed(method: str, path: str) -> Response:
    allow = "GET" if path == "/healthz" else "POST" if path == "/act" else "GET, POST"
    return http.text(
        HTTPStatus.METHOD_NOT_ALLOWED,
        f"method {method} not allowed; POST /act, GET /healthz or a WebSocket GET",
        allow=allow,
    )


# ----------------------------------------------------------------------------------------------------------
# Server


class PolicyServer:
    """Serves a policy on one port; `await server.serve(stop)` runs until `stop` resolves."""

    def __init__(self, policy: ServablePolicy, config: ServerConfig = ServerConfig()) -> None:
        self.policy = policy
        self.config = config
        self.port: int | None = None
        self._batcher: Batcher | None = None
        metadata = dict(policy.metadata)
        self._metadata = packb(metadata)
        self._num_anchors = int(metadata.get("num_anchors", 30))
        self._sessions: set[Session | None] = set()
        self.limits = Limits(config.max_connections, config.max_buffered_bytes)

    async def serve(
        self, stop: asyncio.Future[Any] | asyncio.Event, ready: threading.Event | None = None
    ) -> None:
        cfg = self.config
        self._batcher = Batcher(self.policy, cfg.max_batch, cfg.max_wait_ms)
        batch_task = asyncio.create_task(self._batcher.run())
        try:
            async with serve(
                self._handle_ws,
                cfg.host,
                cfg.port,
                # typed as a ServerConnection class, documented (and used) as a factory that is only called
                create_connection=functools.partial(  # type: ignore[arg-type]
                    Connection, app=self, limits=self.limits, max_body=cfg.max_message_bytes
                ),
                compression=None,  # images do not deflate; save the CPU
                max_size=cfg.max_message_bytes,
                # Messages of one connection are answered in order, so queueing more only holds memory:
                # past one queued frame, reading from that client pauses (TCP backpressure).
                max_queue=1,
                open_timeout=cfg.open_timeout_s,
            ) as server:
                self.port = _bound_port(server)
                logger.info("serving on %s:%d (ws + http)", cfg.host, self.port)
                if ready is not None:
                    ready.set()
                await (stop.wait() if isinstance(stop, asyncio.Event) else stop)
        finally:
            batch_task.cancel()
            self._batcher.close()

    def _authorized(self, headers: Headers) -> bool:
        if self.config.api_key is None:
            return True
        expected = f"Api-Key {self.config.api_key}"
        return hmac.compare_digest(headers.get("Authorization", "").encode(), expected.encode())

    async def respond(self, request: http.Request) -> Response | None:
        """Every HTTP request on the port (`connection.Connection` reads it): the reply, or None to open a
        WebSocket (on any path, as openpi's server)."""
        path, method = request.route, request.method
        origin = request.headers.get("Origin")
        if origin is not None and not self.config.origin_allowed(origin):
            return http.text(
                HTTPStatus.FORBIDDEN,
                f"cross-origin request from Origin {origin!r} refused (start the server with --allow-origin "
                f"{origin} to allow it)",
            )
        if method == "GET" and request.body is not None:
            if path != "/act":
                return http.text(HTTPStatus.BAD_REQUEST, "a GET request has no body")
            return _method_not_allowed(method, path)
        if path == "/healthz" and method == "GET":
            assert self._batcher is not None
            return http.json_reply(HTTPStatus.OK, {"status": "ok", "pending": self._batcher.pending})
        if not self._authorized(request.headers):
            return http.text(
                HTTPStatus.UNAUTHORIZED, "missing or wrong API key (send 'Authorization: Api-Key <key>')"
            )
        if request.body is not None:
            if method == "POST" and path == "/act":
                return await self._act(request.body)
            if method == "POST":
                return http.text(HTTPStatus.NOT_FOUND, f"no POST route {path!r}; POST /act")
            return _method_not_allowed(method, path)
        if path == "/act" and "websocket" not in request.headers.get("Upgrade", "").lower():
            return _method_not_allowed(method, path)  # a browser or curl on the HTTP route
        return None

    async def _answer(self, codec: Codec, data: bytes) -> bytes:
        """One request in `codec`'s format -> the bytes of its reply (raises RequestError for a bad request)."""
        assert self._batcher is not None
        # Off the loop: decoding a 16 MiB body takes long enough to stall every other client's replies.
        obs = await asyncio.to_thread(codec.loads, data)
        return codec.dumps(await self._batcher.submit(obs, codec))

    def _select(self, obs: Any) -> Session:
        """A connection's ``{"execution": {"strategy": ..., ...}}`` message -> its new session (RequestError)."""
        if not isinstance(obs, Mapping) or set(obs) != {"execution"}:
            raise RequestError("an execution message holds only the key 'execution'")
        try:
            strategy = strategy_from_dict(obs["execution"])
        except ValueError as err:
            raise RequestError(str(err)) from None
        return Session(strategy, self._num_anchors)

    async def _act(self, body: bytes) -> Response:
        """The authors' `POST /act` (`codecs.act`)."""
        try:
            return http.json_reply(HTTPStatus.OK, await self._answer(ACT, body))
        except RequestError as err:
            return http.json_reply(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        except Exception as err:
            return http.json_reply(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(err).__name__}: {err}"}
            )

    async def _handle_ws(self, conn: ServerConnection) -> None:
        """One WebSocket connection. Its execution session (if the client selects a strategy) lives in this
        scope only: nothing outside refers to it once the connection ends, whatever was in flight."""
        assert self._batcher is not None
        session: Session | None = None
        try:
            await conn.send(self._metadata)
            async for message in conn:
                # counted in `limits` by the connection as its frames arrived (`Connection._feed_frames`)
                size = len(message) if isinstance(message, bytes) else len(message.encode())
                try:
                    if isinstance(message, str):
                        raise RequestError("expected a binary msgpack message, got a text frame")
                    codec = self.policy.codec
                    obs = await asyncio.to_thread(codec.loads, message)  # off the loop, as `_answer`
                    if isinstance(obs, Mapping) and "execution" in obs:  # (re)select: a fresh session
                        self._sessions.discard(session)
                        session = self._select(obs)
                        self._sessions.add(session)
                        reply = packb({"execution": strategy_to_dict(session.strategy)})
                    else:
                        reply = codec.dumps(await self._batcher.submit(obs, codec, session))
                except RequestError as err:
                    await conn.send(f"invalid request: {err}")
                    continue
                except Exception as err:
                    logger.exception("request failed")
                    await conn.send(f"server error: {type(err).__name__}: {err}")
                    continue
                finally:
                    if isinstance(conn, Connection):
                        conn.release_message(size)
                await conn.send(reply)
        except ConnectionClosed:
            pass
        finally:
            self._sessions.discard(session)

    @property
    def open_sessions(self) -> int:
        """Connections holding an execution session now."""
        return len(self._sessions)


def _bound_port(server: Server) -> int:
    return int(next(iter(server.sockets)).getsockname()[1])


# The event loop answers only once it holds the GIL, which the validation, decoding and model threads hand over
# every switch interval (Python's default 5 ms; several threads waiting make it a multiple). 32 clients x 1000
# requests on 2 shared cores: /healthz p99 109 -> 86 ms, polls over 50 ms 13% -> 10%, throughput 108 -> 121 req/s
# (docs/serving.md, "Load test").
SWITCH_INTERVAL_S = 0.001


def run_server(policy: ServablePolicy, config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    import gc
    import signal
    import sys

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()  # the loaded model and libraries leave the GC's generations: full collections stay short

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await PolicyServer(policy, config).serve(stop)

    asyncio.run(main())


class ServerThread:
    """A server on a background thread (tests, benchmarks, notebooks): `with ServerThread(policy) as s: s.port`."""

    def __init__(self, policy: ServablePolicy, config: ServerConfig = ServerConfig(port=0)) -> None:
        self.server = PolicyServer(policy, config)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="xvla-server", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        try:
            self._loop.run_until_complete(self.server.serve(self._stop, self._ready))
        except BaseException as err:
            self._error = err
            self._ready.set()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(timeout=60)
        if self._error is not None or self.server.port is None:
            raise RuntimeError(f"server failed to start: {self._error!r}")
        return self

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://{self.server.config.host}:{self.port}"

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Batcher", "PolicyServer", "ServerConfig", "ServerThread", "ServablePolicy", "run_server"]
