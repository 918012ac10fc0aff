"""A real server on 127.0.0.1 (free port): clients, protocols, errors, batching, fuzzing."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import json_numpy
import msgpack
import numpy as np
import pytest
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from xvla.serve import protocol
from xvla.serve.client import PolicyClient, ServerError
from xvla.serve.codecs import ACT, RAW
from xvla.serve.policy import Policy
from xvla.serve.server import ServerConfig, ServerThread

from .helpers import SlowPolicy, nan_policy, raw_obs, robot_obs


def _http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_clients_get_the_same_actions_as_the_policy(robot_server: ServerThread, policy: Policy) -> None:
    obs = robot_obs(np.random.default_rng(10))
    direct = policy.infer(obs)
    with PolicyClient("127.0.0.1", robot_server.port, api_key="secret") as client:
        meta = client.metadata
        assert meta["protocol"] == "source" and meta["chunk_length"] == 20 and meta["control_hz"] == 10.0
        assert meta["cameras"] == ["observation.images.front", "observation.images.wrist"]
        reply = client.infer(obs)
    assert reply["actions"].shape == (20, 7)
    np.testing.assert_allclose(reply["actions"], direct["actions"], atol=1e-4)
    timing = reply["server_timing"]
    assert timing["batch_size"] >= 1 and timing["infer_ms"] > 0 and timing["queue_ms"] >= 0

    openpi = WebsocketClientPolicy("127.0.0.1", robot_server.port, api_key="secret")
    assert openpi.get_server_metadata()["domains"] == {"toy_arm": 3, "other_arm": 5}
    np.testing.assert_allclose(openpi.infer(obs)["actions"], direct["actions"], atol=1e-4)
    with pytest.raises(RuntimeError, match="missing field 'state'"):  # errors reach openpi clients as text
        openpi.infer({k: v for k, v in obs.items() if k != "state"})
    np.testing.assert_allclose(openpi.infer(obs)["actions"], direct["actions"], atol=1e-4)  # still serving


def test_authors_http_act_protocol(raw_server: ServerThread, raw_policy: Policy) -> None:
    obs = raw_obs(np.random.default_rng(11))
    status, body = _http(
        f"http://127.0.0.1:{raw_server.port}/act",
        json_numpy.dumps(obs).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200, body
    action = np.asarray(json.loads(body)["action"])
    assert action.shape == (30, 20)
    np.testing.assert_allclose(action, raw_policy.infer(obs)["actions"], atol=1e-4)
    # the same fields over the WebSocket
    with PolicyClient("127.0.0.1", raw_server.port) as client:
        assert client.metadata["protocol"] == "raw"
        np.testing.assert_allclose(client.infer(obs)["actions"], action, atol=1e-4)
    bad = {**obs, "proprio": np.full(20, np.nan)}
    status, body = _http(f"http://127.0.0.1:{raw_server.port}/act", json_numpy.dumps(bad).encode())
    assert status == 400 and "proprio: contains NaN" in json.loads(body)["error"]
    assert _http(f"http://127.0.0.1:{raw_server.port}/act", b"{not json")[0] == 400
    assert _http(f"http://127.0.0.1:{raw_server.port}/nope", b"{}")[0] == 404
    assert _http(f"http://127.0.0.1:{raw_server.port}/act", b"x" * (2 * 2**20))[0] == 413
    status, body = _http(f"http://127.0.0.1:{raw_server.port}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_api_key(robot_server: ServerThread) -> None:
    url = f"http://127.0.0.1:{robot_server.port}"
    assert _http(url + "/act", b"{}")[0] == 401
    assert _http(url + "/act", b"{}", {"Authorization": "Api-Key wrong"})[0] == 401
    assert _http(url + "/healthz")[0] == 200  # health checks need no key
    with pytest.raises(ServerError, match="401"):
        PolicyClient("127.0.0.1", robot_server.port, api_key="wrong")
    with pytest.raises(InvalidStatus):
        WebsocketClientPolicy("127.0.0.1", robot_server.port)


BAD_REQUESTS: list[tuple[Any, str]] = [
    ("a text frame", "expected a binary msgpack message"),
    (b"\xc1\x00", "invalid msgpack"),
    (protocol.packb([1, 2, 3]), "must be a map"),
    (protocol.packb({"image0": np.zeros((64, 64, 3), np.uint8)}), "missing field"),
    ("no camera", "missing camera"),
    ("float image", "expected dtype uint8"),
    ("flat image", r"expected shape \[H, W, 3\]"),
    ("unknown domain", "unknown domain 'moon'"),
    ("nan state", "state: contains NaN"),
]


def _bad(kind: Any) -> bytes | str:
    if isinstance(kind, bytes):
        return kind
    obs = robot_obs(np.random.default_rng(12))
    if kind == "no camera":
        del obs["images"]["observation.images.front"]
    elif kind == "float image":
        obs["images"]["observation.images.front"] = np.zeros((8, 8, 3), np.float32)
    elif kind == "flat image":
        obs["images"]["observation.images.front"] = np.zeros((8, 8), np.uint8)
    elif kind == "unknown domain":
        obs["domain"] = "moon"
    elif kind == "nan state":
        obs["state"][2] = np.nan
    else:
        return kind  # sent as a text frame
    return protocol.packb(obs)


def test_bad_requests_are_answered_and_the_connection_keeps_serving(robot_server: ServerThread) -> None:
    with connect(
        f"ws://127.0.0.1:{robot_server.port}", additional_headers={"Authorization": "Api-Key secret"}
    ) as ws:
        protocol.unpackb(ws.recv())  # metadata
        for kind, needle in BAD_REQUESTS:
            ws.send(_bad(kind))
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str), kind
            assert pytest.importorskip("re").search(needle, reply), (kind, reply)
        ws.send(protocol.packb(robot_obs(np.random.default_rng(13))))
        assert protocol.unpackb(ws.recv(timeout=30))["actions"].shape == (20, 7)


def test_oversized_message_closes_only_that_connection(raw_server: ServerThread) -> None:
    with connect(f"ws://127.0.0.1:{raw_server.port}", max_size=None) as ws:
        ws.recv()
        ws.send(b"\x00" * (2 * 2**20))  # limit is 1 MiB
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=30)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    assert "exceeds limit" in info.value.rcvd.reason
    with PolicyClient("127.0.0.1", raw_server.port) as client:
        with pytest.raises(ServerError, match="message too big"):
            client.infer({"blob": np.zeros(2 * 2**20, np.uint8)})
        assert client.infer(raw_obs(np.random.default_rng(14)))["actions"].shape == (30, 20)  # reconnected


def _fuzz_messages(n: int, rng: np.random.Generator) -> list[bytes | str]:
    """Malformed messages: random bytes, truncations and byte flips of a valid message, random msgpack
    values, valid requests with one field replaced by garbage, text frames."""
    good = protocol.packb(raw_obs(np.random.default_rng(15)))
    garbage: list[Any] = [
        None,
        True,
        -1,
        2**40,
        1.5,
        float("nan"),
        "x" * 50,
        b"\x00" * 7,
        [],
        {},
        [1, "a"],
        {"k": {"k": [None]}},
        {b"__ndarray__": True, b"data": b"\x00", b"dtype": "<f8", b"shape": [3]},
        {b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": [0]},
        {b"__npgeneric__": True, b"data": 1, b"dtype": "|u1"},
    ]
    fields = ["image0", "image1", "image2", "language_instruction", "proprio", "domain_id", "steps"]
    out: list[bytes | str] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        elif kind == 1:
            out.append(good[: int(rng.integers(0, len(good)))])
        elif kind == 2:  # flip bytes in the header region (keys, dtypes, shapes), keep the pixel data
            msg = bytearray(good)
            for pos in rng.integers(0, 120, 3):
                msg[pos] = int(rng.integers(0, 256))
            out.append(bytes(msg) + (b"" if rng.random() < 0.5 else b"\x00"))  # and often trailing bytes
        elif kind == 3:
            value = garbage[int(rng.integers(len(garbage)))]
            out.append(msgpack.packb(value if rng.random() < 0.5 else {"image0": value}, use_bin_type=True))
        elif kind == 4:
            obs = raw_obs(np.random.default_rng(i))
            obs[fields[int(rng.integers(len(fields)))]] = garbage[int(rng.integers(len(garbage)))]
            if obs.get("image1") is not None and rng.random() < 0.5:
                obs.pop("image0")
            out.append(msgpack.packb(obs, default=protocol._pack_default, use_bin_type=True))
        else:
            out.append("".join(chr(int(c)) for c in rng.integers(32, 127, 20)))
    return out


def test_fuzz_1000_malformed_messages_then_a_good_one(raw_server: ServerThread) -> None:
    messages = _fuzz_messages(1200, np.random.default_rng(16))
    errors = 0
    with connect(f"ws://127.0.0.1:{raw_server.port}") as ws:
        protocol.unpackb(ws.recv())
        for message in messages:
            ws.send(message)
            reply = ws.recv(timeout=30)  # every message gets exactly one answer, in order
            if isinstance(reply, str):
                assert reply.startswith("invalid request: "), reply
                errors += 1
            else:
                assert protocol.unpackb(reply)["actions"].shape == (30, 20)
        assert errors >= 1000
        ws.send(protocol.packb(raw_obs(np.random.default_rng(17))))
        assert protocol.unpackb(ws.recv(timeout=30))["actions"].shape == (30, 20)
    assert _http(f"http://127.0.0.1:{raw_server.port}/healthz")[0] == 200


def test_concurrent_requests_are_batched(robot_server: ServerThread) -> None:
    sizes: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with PolicyClient("127.0.0.1", robot_server.port, api_key="secret") as client:
            for _ in range(3):
                reply = client.infer(robot_obs(rng))
                assert reply["actions"].shape == (20, 7)
                with lock:
                    sizes.append(reply["server_timing"]["batch_size"])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(sizes) == 18
    assert max(sizes) > 1 and max(sizes) <= 4  # max_batch=4


def test_event_loop_stays_responsive_during_inference(raw_policy: Policy) -> None:
    with ServerThread(SlowPolicy(raw_policy, 2.5), ServerConfig(port=0)) as server:
        done = threading.Event()

        def slow_request() -> None:
            with PolicyClient("127.0.0.1", server.port) as client:
                client.infer(raw_obs(np.random.default_rng(18)))
            done.set()

        threading.Thread(target=slow_request, daemon=True).start()
        time.sleep(0.3)  # the request is now in the worker thread
        t0 = time.perf_counter()
        assert _http(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
        with (
            PolicyClient("127.0.0.1", server.port) as client,
            pytest.raises(ServerError, match="missing field 'image0'"),
        ):
            client.infer({"proprio": np.zeros(20)})
        assert time.perf_counter() - t0 < 1.5 and not done.is_set()  # the forward pass takes 2.5 s
        assert done.wait(timeout=30)


def test_http_expect_100_continue(raw_server: ServerThread) -> None:
    """curl sends `Expect: 100-continue` before a large body; the server says continue instead of stalling."""
    import socket

    body = json_numpy.dumps(raw_obs(np.random.default_rng(19))).encode()
    head = f"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    with socket.create_connection(("127.0.0.1", raw_server.port), timeout=30) as sock:
        sock.sendall(head.encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert np.asarray(json.loads(reply.split(b"\r\n\r\n", 1)[1])["action"]).shape == (30, 20)


class _FailingPolicy(SlowPolicy):
    """Fails its first forward pass (a model error), then works."""

    def __init__(self, inner: Policy) -> None:
        super().__init__(inner, 0.0)
        self.failed = False

    def run(self, prepared: list) -> list:  # noqa: ANN001
        if not self.failed:
            self.failed = True
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().run(prepared)


def test_a_model_failure_fails_its_batch_only(raw_policy: Policy) -> None:
    with ServerThread(_FailingPolicy(raw_policy), ServerConfig(port=0)) as server:
        client = PolicyClient("127.0.0.1", server.port)
        with pytest.raises(
            ServerError, match="server error: RuntimeError: inference failed: .*out of memory"
        ):
            client.infer(raw_obs(np.random.default_rng(23)))
        assert client.infer(raw_obs(np.random.default_rng(23)))["actions"].shape == (30, 20)
        client.close()


POISON = 123.0  # proprio[0] of a request that passes validation but breaks the model (see _PoisonPolicy)


class _PoisonPolicy(SlowPolicy):
    """Any batch holding a poisoned request fails, like a model that raises on one sample's values; records the
    composition of every batch it is given."""

    def __init__(self, inner: Policy) -> None:
        super().__init__(inner, 0.05)
        self.batches: list[list[bool]] = []

    def run(self, prepared: list) -> list:  # noqa: ANN001
        poisoned = [bool(p.proprio[0] == POISON) for p in prepared]
        self.batches.append(poisoned)
        if any(poisoned):
            raise RuntimeError("model blew up on a poisoned sample (simulated)")
        return super().run(prepared)


def _together(n: int, request: Any) -> list[Any]:
    """Run `request(i)` for i < n on n threads released at once; returns each result or exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = request(i)
        except Exception as err:
            results[i] = err

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_a_request_that_breaks_its_batch_fails_only_itself(raw_policy: Policy) -> None:
    policy = _PoisonPolicy(raw_policy)
    with ServerThread(policy, ServerConfig(port=0, max_batch=8, max_wait_ms=300.0)) as server:
        clients = [PolicyClient("127.0.0.1", server.port, retries=0) for _ in range(8)]

        def request(i: int) -> dict:
            obs = raw_obs(np.random.default_rng(40 + i))
            if i == 3:
                obs["proprio"][0] = POISON
            return clients[i].infer(obs)

        results = _together(8, request)
        for client in clients:
            client.close()
    mixed = [b for b in policy.batches if any(b) and not all(b)]
    assert mixed, policy.batches  # the poisoned request did share a batch with good ones
    for i, result in enumerate(results):
        if i == 3:
            assert isinstance(result, ServerError) and "poisoned sample" in str(result), result
        else:
            assert isinstance(result, dict) and result["actions"].shape == (30, 20), (i, result)
            assert np.isfinite(result["actions"]).all()


def test_extreme_values_are_refused_and_other_clients_are_served(robot_server: ServerThread) -> None:
    """Finite but extreme values (float64 fine, float32 inf, or absurd poses) are 400s naming the field; the
    good requests sent at the same moment, batched with whatever passes, all succeed."""
    hostile: list[tuple[str, Any]] = [
        ("state", 1e20),
        ("state", 1e38),
        ("state", 1e300),
        ("state", -1e10),
    ]

    def request(i: int) -> Any:
        obs = robot_obs(np.random.default_rng(50 + i))
        if i < len(hostile):
            field, value = hostile[i]
            obs[field] = obs[field].astype(np.float64)
            obs[field][i % 3] = value
        with PolicyClient("127.0.0.1", robot_server.port, api_key="secret", retries=0) as client:
            return [client.infer(obs) for _ in range(2)]

    results = _together(len(hostile) + 6, request)
    for i, result in enumerate(results):
        if i < len(hostile):
            assert isinstance(result, ServerError), result
            assert "invalid request: state" in str(result) and "is outside" in str(result), result
        else:
            assert isinstance(result, list), (i, result)
            assert all(np.isfinite(r["actions"]).all() and r["actions"].shape == (20, 7) for r in result)


@pytest.mark.parametrize(
    "proprio",
    [[1e30] * 20, [10**400] * 20, [1e300] * 20],
    ids=["float32-range", "huge-int", "float64-only"],
)
def test_http_extreme_proprio_is_a_400_naming_the_field(raw_server: ServerThread, proprio: list) -> None:
    body = json_numpy.dumps({**raw_obs(np.random.default_rng(60)), "proprio": proprio}).encode()
    status, reply = _http(f"http://127.0.0.1:{raw_server.port}/act", body)
    assert status == 400, reply
    assert json.loads(reply)["error"].startswith("proprio"), reply


def test_non_finite_actions_are_never_sent(raw_policy: Policy) -> None:
    with ServerThread(nan_policy(raw_policy), ServerConfig(port=0)) as server:
        obs = raw_obs(np.random.default_rng(61))
        status, reply = _http(f"http://127.0.0.1:{server.port}/act", json_numpy.dumps(obs).encode())
        assert status == 500 and "non-finite actions" in json.loads(reply)["error"], reply
        assert "action" not in json.loads(reply)
        with (
            PolicyClient("127.0.0.1", server.port, retries=0) as client,
            pytest.raises(ServerError, match="NonFiniteActionError: the model produced non-finite actions"),
        ):
            client.infer(obs)


def _raw_http(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes the connection."""
    import socket

    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_http_edge_cases_get_answers_and_no_internal_errors(
    raw_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    body = json_numpy.dumps(raw_obs(np.random.default_rng(62))).encode()
    head = f"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with caplog.at_level(logging.DEBUG):
        put = _raw_http(raw_server.port, b"PUT /act HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        delete = _raw_http(raw_server.port, b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        # One request per connection: bytes after the body (garbage or a pipelined request) are ignored.
        trailing = [_raw_http(raw_server.port, head + body + extra) for extra in (b"GARBAGE", head)]
    assert put.startswith(b"HTTP/1.1 405") and b"\r\nAllow: POST\r\n" in put, put
    assert delete.startswith(b"HTTP/1.1 405") and b"\r\nAllow: GET\r\n" in delete, delete
    for reply in trailing:
        assert reply.startswith(b"HTTP/1.1 200 OK"), reply[:200]
        assert np.asarray(json.loads(reply.split(b"\r\n\r\n", 1)[1])["action"]).shape == (30, 20)
    internal = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not internal, [r.getMessage() for r in internal]


UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
)


@pytest.mark.parametrize(
    ("request_bytes", "status", "needle"),
    [
        (b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", b"400", b"a GET request has no body"),
        (
            b"GET / HTTP/1.1\r\n" + UPGRADE + b"Content-Length: 3\r\n\r\nabc",
            b"400",
            b"a GET request has no body",
        ),
        (b"GET /act HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", b"405", b"\r\nAllow: POST\r\n"),
        (b"GET /act HTTP/1.1\r\nHost: x\r\n\r\n", b"405", b"\r\nAllow: POST\r\n"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE", b"200", b'"status": "ok"'),
        (b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n", b"400", b"invalid HTTP header line"),
        (b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400", b"chunked"),
        (b"GET /healthz\r\n\r\n", b"400", b"malformed HTTP request"),
        (b"GET /healthz HTTP/2.0\r\n\r\n", b"400", b"HTTP/1.1 or HTTP/1.0"),
        (b"GET /\xff HTTP/1.1\r\n\r\n", b"400", b"malformed HTTP request"),
        (b"POST /act HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n{}", b"400", b"Content-Length"),
        (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431", b"headers too large"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414", b"request line too long"),
        # frames pipelined before the 101 (clients must wait for it; a sloppy one may not) are parsed after it
        (b"GET / HTTP/1.1\r\n" + UPGRADE + b"\r\nGARBAGE", b"101", b"\x88"),  # a close frame: bad framing
    ],
    ids=[
        "get-with-body",
        "upgrade-with-body",
        "get-act-with-body",
        "get-act",
        "get-then-garbage",
        "bad-header",
        "get-chunked",
        "no-version",
        "http2",
        "non-ascii-path",
        "bad-content-length",
        "long-header",
        "long-request-line",
        "upgrade-then-garbage",
    ],
)
def test_malformed_http_requests_get_an_answer(
    raw_server: ServerThread,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    status: bytes,
    needle: bytes,
) -> None:
    """websockets' handshake parser closed these without a word (or raised an AssertionError inside the
    handshake, logged as an internal error); each gets a status line now, and the server keeps serving."""
    with caplog.at_level(logging.INFO):
        reply = _raw_http(raw_server.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:300]
    assert needle in reply, reply[:300]
    internal = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not internal, [r.getMessage() for r in internal]
    assert _http(f"http://127.0.0.1:{raw_server.port}/healthz")[0] == 200


def test_a_frame_sent_with_the_upgrade_request_is_answered(raw_server: ServerThread) -> None:
    """The bytes wait in the buffer while the handshake is answered; they are parsed as soon as it is, not when
    the client next sends something."""
    import socket

    from websockets.frames import Frame, Opcode

    frame = Frame(Opcode.TEXT, b"hello").serialize(mask=True, extensions=[])
    reply = b""
    with socket.create_connection(("127.0.0.1", raw_server.port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n" + UPGRADE + b"\r\n" + frame)
        while b"invalid request: expected a binary msgpack message" not in reply:
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 101"), reply[:300]


def test_xvla_serve_hands_the_gil_over_every_millisecond(
    raw_policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop answers only once it holds the GIL; Python's 5 ms switch interval, times the threads
    waiting, made /healthz slower under load (docs/serving.md, "Load test")."""
    import asyncio
    import sys

    from xvla.serve import server as server_module

    seen: list[float] = []

    def run(coroutine: Any) -> None:
        seen.append(sys.getswitchinterval())
        coroutine.close()

    default = sys.getswitchinterval()
    monkeypatch.setattr(asyncio, "run", run)
    try:
        server_module.run_server(raw_policy, ServerConfig(port=0))
    finally:
        sys.setswitchinterval(default)
    assert seen == [server_module.SWITCH_INTERVAL_S] and default > server_module.SWITCH_INTERVAL_S


def test_server_freezes_what_is_loaded_out_of_the_garbage_collector(raw_policy, monkeypatch) -> None:
    """A full collection over the loaded model and libraries stalled the event loop: one /healthz poll per
    32 x 300 load run took 170-230 ms; with the loaded objects frozen, 0 of about 640 polls went over 50 ms
    (docs/reliability.md)."""
    import asyncio
    import gc

    from xvla.serve import server as server_module

    frozen: list[int] = []

    def run(coroutine: Any) -> None:
        frozen.append(gc.get_freeze_count())
        coroutine.close()

    monkeypatch.setattr(asyncio, "run", run)
    try:
        server_module.run_server(raw_policy, ServerConfig(port=0))
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 0


# ---------------------------------------------------------------------------------------------- issue 14 D8
@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:3000", True),
        ("http://127.0.0.1:8888", True),
        ("http://[::1]:5173", True),
        ("https://evil.example", False),
        ("http://localhost.evil.example", False),
        ("null", False),  # a local file or a sandboxed frame
        ("http://[bad", False),
    ],
)
def test_origin_rule(origin: str, allowed: bool) -> None:
    assert ServerConfig().origin_allowed(origin) is allowed
    assert ServerConfig(allow_origins=("https://evil.example/",)).origin_allowed("https://EVIL.example")
    assert ServerConfig(allow_origins=("*",)).origin_allowed(origin)
    assert ServerConfig(host="10.0.0.7").origin_allowed("http://10.0.0.7:8080")


def test_cross_origin_requests_are_refused(raw_server: ServerThread) -> None:
    """A web page the operator opens could otherwise drive the unauthenticated server on localhost: browsers
    attach Origin to WebSocket handshakes and to "simple" text/plain POSTs that need no CORS preflight."""
    url = f"http://127.0.0.1:{raw_server.port}"
    body = json_numpy.dumps(raw_obs(np.random.default_rng(63))).encode()
    evil = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    status, reply = _http(url + "/act", body, evil)
    assert status == 403 and b"Origin 'https://evil.example' refused" in reply and b"--allow-origin" in reply
    assert _http(url + "/healthz", None, evil)[0] == 403
    with pytest.raises(InvalidStatus, match="403"):
        connect(f"ws://127.0.0.1:{raw_server.port}", origin="https://evil.example", open_timeout=30)
    # no Origin (robots, scripts) and loopback pages are served
    assert _http(url + "/act", body)[0] == 200
    assert _http(url + "/act", body, {"Origin": "http://localhost:3000"})[0] == 200
    with connect(f"ws://127.0.0.1:{raw_server.port}", origin="http://127.0.0.1:9000", open_timeout=30) as ws:
        assert msgpack.unpackb(ws.recv())["protocol"] == "raw"


def test_an_allowed_origin_is_served(raw_policy: Policy) -> None:
    config = ServerConfig(port=0, allow_origins=("https://dashboard.example",))
    with ServerThread(raw_policy, config) as server:
        url = f"ws://127.0.0.1:{server.port}"
        with connect(url, origin="https://dashboard.example", open_timeout=30) as ws:
            assert msgpack.unpackb(ws.recv())["protocol"] == "raw"
        with pytest.raises(InvalidStatus, match="403"):
            connect(url, origin="https://evil.example", open_timeout=30)


# ---------------------------------------------------------------------------------------------- issue 14 D6
@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_bodies_are_decoded_off_the_event_loop(
    raw_policy: Policy, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """A decode that never finishes (a stand-in for 4 concurrent 15 MiB JSON bodies, which stalled /healthz for
    up to 5.9 s) must leave the loop free: /healthz answers while it runs."""
    started, release = threading.Event(), threading.Event()
    threads: list[str] = []

    def blocking(decode: Any) -> Any:
        def wrapper(data: Any) -> Any:
            threads.append(threading.current_thread().name)
            started.set()
            assert release.wait(60)
            return decode(data)

        return wrapper

    for codec in (ACT, RAW):
        monkeypatch.setattr(codec, "loads", blocking(codec.loads))
    obs = raw_obs(np.random.default_rng(64))
    replies: list[Any] = []
    with ServerThread(raw_policy, ServerConfig(port=0)) as server:

        def send() -> None:
            if transport == "http":
                body = json_numpy.dumps(obs).encode()
                replies.append(_http(f"http://127.0.0.1:{server.port}/act", body)[0])
            else:
                with PolicyClient("127.0.0.1", server.port) as client:
                    replies.append(client.infer(obs)["actions"].shape)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert started.wait(30)
            status, body = _http(f"http://127.0.0.1:{server.port}/healthz")  # the loop is not blocked
            assert status == 200 and json.loads(body)["status"] == "ok"
        finally:
            release.set()
            sender.join(60)
    assert replies == [200 if transport == "http" else (30, 20)]
    assert threads and "xvla-server" not in threads  # never on the loop's thread


# ---------------------------------------------------------------------------------------------- issue 14 D5
def _until(condition: Any, what: str) -> None:
    """Wait for the server's loop to catch up (a deadline against hangs, not a timing threshold)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_connections_over_the_cap_are_refused_until_others_leave(
    raw_policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    """8 connections pipelining 14 MiB messages held 2.3 GB; a cap bounds what any number of clients can hold.
    Connections count from the TCP accept, so clients that never send a request count too."""
    import socket

    with ServerThread(raw_policy, ServerConfig(port=0, max_connections=2)) as server:
        limits = server.server.limits
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
        _until(lambda: limits.connections == 2, "the two idle connections are counted")
        reply = _raw_http(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert b"server busy: 2 connections open, the limit is 2 (max_connections)" in reply
        with pytest.raises(InvalidStatus, match="503"):
            connect(f"ws://127.0.0.1:{server.port}", open_timeout=30)
        idle.pop().close()
        _until(lambda: limits.connections == 1, "a closed connection is no longer counted")
        assert _http(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
        with PolicyClient("127.0.0.1", server.port) as client:
            assert client.infer(raw_obs(np.random.default_rng(65)))["actions"].shape == (30, 20)
        idle.pop().close()
        _until(lambda: limits.connections == 0, "every connection released")
    internal = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not internal, [r.getMessage() for r in internal]


def test_buffered_bytes_over_the_cap_are_refused_and_returned(
    raw_policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one large body is being decoded (held in memory), a second that would pass max_buffered_mb is
    refused before it is read; once the first is answered the bytes are returned and new requests are served."""
    from xvla.serve import limits as limits_module

    started, release = threading.Event(), threading.Event()
    real_decode = ACT.loads

    def held(data: bytes) -> Any:
        if len(data) > 2**19:  # only the large body waits
            started.set()
            assert release.wait(60)
        return real_decode(data)

    trims: list[bool] = []
    monkeypatch.setattr(ACT, "loads", held)
    monkeypatch.setattr(limits_module, "release_memory", lambda: trims.append(True))
    monkeypatch.setattr(limits_module, "TRIM_AFTER_BYTES", 1)
    obs = raw_obs(np.random.default_rng(66))
    large = json_numpy.dumps({**obs, "padding": "x" * 700_000}).encode()  # ~0.7 of max_buffered
    config = ServerConfig(port=0, max_message_mb=1.0, max_buffered_mb=1.0)
    with ServerThread(raw_policy, config) as server:
        url, limits = f"http://127.0.0.1:{server.port}/act", server.server.limits
        first: list[int] = []
        sender = threading.Thread(target=lambda: first.append(_http(url, large)[0]))
        sender.start()
        try:
            assert started.wait(30)
            assert limits.buffered == len(large)
            status, reply = _http(url, large)
            assert status == 503 and b"(max_buffered_mb); retry later" in reply
            with (
                PolicyClient("127.0.0.1", server.port, retries=0) as client,  # a WebSocket message too
                pytest.raises(
                    ConnectionError, match=r"1013 \(try again later\) server busy: .*max_buffered_mb"
                ),
            ):
                client.infer({**obs, "padding": "x" * 700_000})
        finally:
            release.set()
            sender.join(60)
        assert first == [200]
        _until(lambda: limits.connections == 0, "every client has left")
        assert limits.buffered == 0  # bytes returned
        # freed memory handed back to the OS; the trim runs in the loop's executor, so it may come a little later
        _until(lambda: bool(trims), "the idle server released memory")
        assert _http(url, large)[0] == 200


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        ServerConfig(max_connections=0)
    with pytest.raises(ValueError, match=r"max_buffered_mb \(8.0\) must be >= max_message_mb \(16.0\)"):
        ServerConfig(max_buffered_mb=8.0)
