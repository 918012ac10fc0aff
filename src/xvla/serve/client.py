"""Robot-side client for `xvla serve` (numpy, msgpack and websockets only: no torch, no model code).

    client = PolicyClient("127.0.0.1", 8010, api_key=None)
    client.metadata                      # cameras, domains, action convention, chunk length, rate
    reply = client.infer({"images": {...}, "state": state, "instruction": "pick up the cup"})
    reply["actions"]                     # [K, native_dim] at the robot's control rate

A dropped connection or a timeout is retried on a fresh connection (inference requests are idempotent);
a request the server rejects raises `ServerError` with the server's message at once.

At the control rate, with an execution strategy (`xvla.serve.execution`):

    client = PolicyClient(host, port, execution=RealTimeChunking(execute_steps=8))
    while running:
        robot.apply(client.step(observe()))   # one action per tick; the next chunk is computed meanwhile
    client.reset()                            # new episode

`step` counts ticks, requests chunks on a background thread (synchronous: waits for them), measures each
reply's delay in ticks and sends it with the next request; the server keeps the connection's plan and latency
estimate. A reconnect starts a fresh server session (the next chunk is then not inpainted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect

from xvla.serve.execution import Executor, Strategy, Synchronous, ThreadedRequester, strategy_to_dict
from xvla.serve.protocol import packb, unpackb

logger = logging.getLogger(__name__)

_MESSAGE_TOO_BIG = 1009


class ServerError(RuntimeError):
    """The server answered with an error (bad request, server failure, message over its size limit)."""


class PolicyClient:
    """Synchronous WebSocket client; `infer(obs) -> dict`. Also a context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = 8010,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        retries: int = 3,
        retry_delay_s: float = 0.5,
        max_reply_mb: float = 64.0,
        execution: Strategy = Synchronous(),
    ) -> None:
        self.uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        if port is not None:
            self.uri += f":{port}"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.max_reply_bytes = int(max_reply_mb * 2**20)
        self._conn: ClientConnection | None = None
        self.metadata: dict[str, Any] = {}
        self.execution = execution
        self._requester = ThreadedRequester(self.infer)
        self.executor = Executor(execution, self._requester)
        self._connect()

    def _connect(self) -> None:
        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        try:
            conn = connect(
                self.uri,
                additional_headers=headers,
                open_timeout=self.connect_timeout_s,
                compression=None,
                max_size=self.max_reply_bytes,
            )
        except InvalidHandshake as err:  # e.g. 401: retrying cannot help
            raise ServerError(f"server at {self.uri} refused the connection: {err}") from err
        try:
            first = conn.recv(timeout=self.connect_timeout_s)
        except BaseException:
            conn.close()
            raise
        if isinstance(first, str):
            conn.close()
            raise ServerError(f"server at {self.uri} sent an error instead of metadata: {first}")
        self.metadata = unpackb(first)
        try:
            self._select_execution(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _select_execution(self, conn: ClientConnection) -> None:
        """Start a fresh server session for `execution` (the synchronous default needs none)."""
        if isinstance(self.execution, Synchronous):
            return
        conn.send(packb({"execution": strategy_to_dict(self.execution)}))
        ack = conn.recv(timeout=self.connect_timeout_s)
        if isinstance(ack, str):
            raise ServerError(f"server at {self.uri} refused the execution strategy: {ack}")

    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """Send one observation, return the server's reply (`actions`, `server_timing`, ...)."""
        message = packb(dict(obs))
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                if self._conn is None:
                    self._connect()
                assert self._conn is not None
                self._conn.send(message)
                reply = self._conn.recv(timeout=self.timeout_s)
            except ConnectionClosed as err:
                if err.rcvd is not None and err.rcvd.code == _MESSAGE_TOO_BIG:
                    self.close()
                    raise ServerError(f"message too big for the server: {err.rcvd.reason}") from err
                last_error = err
            except (OSError, TimeoutError) as err:
                last_error = err
            else:
                if isinstance(reply, str):
                    raise ServerError(reply)
                out = unpackb(reply)
                if not isinstance(out, dict):
                    raise ServerError(f"unexpected reply of type {type(out).__name__}")
                return out
            logger.warning(
                "request to %s failed (%s); reconnecting (attempt %d)", self.uri, last_error, attempt + 1
            )
            self.close()
            time.sleep(self.retry_delay_s * (attempt + 1))
        raise ConnectionError(f"no reply from {self.uri} after {self.retries + 1} attempts: {last_error}")

    def step(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The action of this control tick under `execution` (module doc); call once per tick."""
        return self.executor.step(obs)

    def reset(self) -> None:
        """New episode: drop the plan and the ticks here and the session on the server."""
        self._requester.wait_idle()
        self.executor.reset()
        try:
            if self._conn is not None:
                self._select_execution(self._conn)
                return
        except (ConnectionClosed, OSError, TimeoutError):
            self.close()
        self._connect()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
