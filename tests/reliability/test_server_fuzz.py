"""Property-based fuzzing of the policy server (issue 14): hypothesis generates malformed WebSocket msgpack
messages and `POST /act` bodies (types, shapes, dtypes, sizes, nesting, extreme finite values, NaN/inf,
truncation). Every one gets an `invalid request:` text frame, a 4xx, or close code 1009 for size; the server
never logs an internal error, never sends a non-finite action, and answers a valid request correctly afterwards.

About 100 examples per transport in the default run (derandomised, so it is the same 100 each time); 1000 of
fresh random ones in the slow run, with the server's RSS growth bounded.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import json_numpy
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from serve.helpers import raw_obs
from xvla.serve import protocol
from xvla.serve.server import ServerThread

GOOD = raw_obs(np.random.default_rng(0))
FIELDS = ("image0", "image1", "image2", "language_instruction", "proprio", "domain_id", "steps")
LIMIT = 2**20  # raw_server's max_message_mb
RSS_GROWTH_MB = 300  # bound for 1000 examples: far below what a leak of their bodies (or the D5 queue) holds

# ------------------------------------------------------------------------------------------------ strategies
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN, +-inf, 1e308 and subnormals included
    | st.text(max_size=20)
)


def _nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


json_values = _nested(json_scalars)
# what msgpack can encode: 64-bit integers, and bin fields besides
values = _nested(
    json_scalars.filter(lambda x: not isinstance(x, int) or -(2**63) <= x < 2**64) | st.binary(max_size=20)
)
dtypes = st.sampled_from(
    [np.bool_, np.uint8, np.int8, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64]
)
arrays = hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
extreme_proprio = hnp.arrays(np.float64, st.sampled_from([(20,), (19,), (21,), (1, 20), (20, 1)]))
images = hnp.arrays(
    st.sampled_from([np.uint8, np.float32, np.int16]),
    st.tuples(st.integers(0, 12), st.integers(0, 12), st.sampled_from([1, 3, 4])),
)
dtype_names = st.sampled_from(["<f4", "|u1", "?", "<i8", "|O", "<U8", "V8", "<c8", ">f8", "f", "", "x"])
shapes = st.lists(st.integers(-3, 2**40), max_size=9) | values
# msgpack's own array encoding with the parts disagreeing: data length, dtype, shape
packed_arrays = st.fixed_dictionaries(
    {b"__ndarray__": st.just(True), b"data": st.binary(max_size=64), b"dtype": dtype_names | values},
    optional={b"shape": shapes},
) | st.fixed_dictionaries({b"__npgeneric__": st.just(True), b"data": values, b"dtype": dtype_names | values})
# json-numpy's, likewise
json_arrays = st.fixed_dictionaries(
    {
        "__numpy__": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | json_values,
        "dtype": dtype_names | json_values,
        "shape": st.lists(st.integers(-3, 2**40), max_size=9) | json_values,
    }
)


def _replaced(replacement: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """The valid observation with one field replaced (or, for `None`, deleted)."""

    def build(field: str, value: Any) -> dict[str, Any]:
        obs = dict(GOOD)
        if value is None:
            obs.pop(field, None)
        else:
            obs[field] = value
        return obs

    return st.builds(build, st.sampled_from(FIELDS), replacement)


field_values = (
    values | arrays | images | extreme_proprio | st.sampled_from([-1, 2**63, 2**64 - 1, 1e300, -1e39])
)


# valid requests at the edges of what is allowed (any image size, proprio up to the +-1e4 bound): served
near_valid = st.builds(
    lambda image, proprio: {**GOOD, "image0": image, "proprio": proprio},
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.just(3))),
    hnp.arrays(np.float32, 20, elements=st.floats(-1e4, 1e4, width=32)),
)


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=protocol._pack_default, use_bin_type=True)


GOOD_MSG = protocol.packb(GOOD)
ws_messages = st.one_of(
    st.binary(max_size=512),
    st.integers(0, len(GOOD_MSG) - 1).map(lambda n: GOOD_MSG[:n]),  # truncation
    st.tuples(st.integers(0, len(GOOD_MSG) - 1), st.integers(0, 255)).map(  # one byte flipped
        lambda p: GOOD_MSG[: p[0]] + bytes([p[1]]) + GOOD_MSG[p[0] + 1 :]
    ),
    st.binary(min_size=1, max_size=8).map(lambda tail: GOOD_MSG + tail),  # trailing bytes
    values.map(_packb),
    _replaced(field_values | packed_arrays).map(_packb),
    st.dictionaries(st.sampled_from(FIELDS), field_values | packed_arrays, max_size=7).map(_packb),
    near_valid.map(_packb),
    st.integers(LIMIT + 1, 2 * LIMIT).map(lambda n: b"\x00" * n),  # over the size limit
    st.text(max_size=50),  # a text frame
)

GOOD_BODY = json_numpy.dumps(GOOD).encode()
extreme_literals = st.sampled_from(
    ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" + "0" * 400, "1e-400"]
)
http_bodies = st.one_of(
    st.binary(max_size=512),
    st.integers(0, len(GOOD_BODY) - 1).map(lambda n: GOOD_BODY[:n]),
    st.binary(min_size=1, max_size=8).map(lambda tail: GOOD_BODY + tail),
    json_values.map(lambda v: json.dumps(v).encode()),
    _replaced(json_values | arrays | images | extreme_proprio | json_arrays).map(
        lambda obs: json_numpy.dumps(obs).encode()
    ),
    near_valid.map(lambda obs: json_numpy.dumps(obs).encode()),
    # numbers json cannot hold as floats, spliced in as text (json-numpy parses them as inf, NaN or a big int)
    st.lists(extreme_literals | st.floats(allow_nan=False).map(repr), min_size=20, max_size=20).map(
        lambda xs: GOOD_BODY.replace(
            b'"proprio": ', b'"proprio": [' + ", ".join(xs).encode() + b'], "x": ', 1
        )
    ),
    st.integers(LIMIT + 1, 2 * LIMIT).map(lambda n: b" " * n),
)


# ------------------------------------------------------------------------------------------------ checks
class _InternalErrors(logging.Handler):
    """What the server logged as an internal error: ERROR and above, or anything with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture
def internal_errors() -> Iterator[list[logging.LogRecord]]:
    handler = _InternalErrors()
    logging.getLogger().addHandler(handler)
    yield handler.records
    logging.getLogger().removeHandler(handler)


def _finite_actions(actions: Any) -> None:
    actions = np.asarray(actions)
    assert actions.shape == (30, 20), actions.shape
    assert np.isfinite(actions).all(), "a non-finite action was sent"


class _WebSocket:
    """One connection for all examples, reopened after the server closes it for size (1009)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: ClientConnection | None = None

    def check(self, message: bytes | str) -> str:
        if self.conn is None:
            self.conn = connect(f"ws://127.0.0.1:{self.port}", max_size=None, open_timeout=30)
            protocol.unpackb(self.conn.recv(timeout=30))  # metadata
        try:
            self.conn.send(message)
            reply = self.conn.recv(timeout=30)  # every message gets exactly one answer
        except ConnectionClosed as closed:
            self.conn = None
            assert closed.rcvd is not None and closed.rcvd.code == CloseCode.MESSAGE_TOO_BIG, closed
            assert len(message) > LIMIT
            return "too big"
        if isinstance(reply, str):
            assert reply.startswith("invalid request: "), reply
            return "refused"
        _finite_actions(protocol.unpackb(reply)["actions"])
        return "served"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/act", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _check_http(port: int, body: bytes) -> str:
    status, reply = _post(port, body)
    if status == 413:
        assert len(body) > LIMIT
        return "too big"
    if status == 400:
        assert json.loads(reply)["error"], reply
        return "refused"
    assert status == 200, (status, reply[:300])
    _finite_actions(json.loads(reply)["action"])
    return "served"


def _fuzz(
    strategy: st.SearchStrategy[Any], check: Callable[[Any], str], examples: int, fast: bool
) -> Counter:
    """Run `check` on `examples` values of `strategy`; how many were refused, too big or served."""
    outcomes: Counter = Counter()

    @settings(
        max_examples=examples,
        deadline=None,  # a valid example runs the model; the machine is shared
        derandomize=fast,
        database=None if fast else settings.default.database,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(strategy)
    def run(value: Any) -> None:
        outcomes[check(value)] += 1

    run()
    return outcomes


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _fuzz_server(
    raw_server: ServerThread,
    internal_errors: list[logging.LogRecord],
    transport: str,
    examples: int,
    fast: bool,
) -> float:
    """Fuzz one transport; then a valid request over each is answered correctly. Returns the RSS growth (MiB)."""
    port = raw_server.port
    start = _rss_mb()
    if transport == "websocket":
        ws = _WebSocket(port)
        try:
            outcomes = _fuzz(ws_messages, ws.check, examples, fast)
            assert ws.check(GOOD_MSG) == "served"  # on the connection that took the fuzz
        finally:
            ws.close()
    else:
        outcomes = _fuzz(http_bodies, lambda body: _check_http(port, body), examples, fast)
    growth = _rss_mb() - start
    print(f"{transport}: {dict(outcomes)}, RSS {start:.0f} -> {start + growth:.0f} MiB")
    # the strategies reach every answer: refusals, size closes and (a field replaced by a valid value) the model
    assert outcomes["refused"] > examples // 2 and outcomes["too big"] and outcomes["served"], outcomes
    assert not internal_errors, [r.getMessage() for r in internal_errors]
    status, reply = _post(port, GOOD_BODY)
    assert status == 200, reply
    _finite_actions(json.loads(reply)["action"])
    with connect(f"ws://127.0.0.1:{port}", open_timeout=30) as conn:
        conn.recv(timeout=30)
        conn.send(GOOD_MSG)
        _finite_actions(protocol.unpackb(conn.recv(timeout=30))["actions"])
    assert raw_server.server.limits.buffered == 0  # every reserved byte returned
    return growth


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_fuzzed_requests_are_refused_by_name_and_never_break_the_server(
    raw_server: ServerThread, internal_errors: list[logging.LogRecord], transport: str
) -> None:
    _fuzz_server(raw_server, internal_errors, transport, examples=100, fast=True)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_1000_fuzzed_requests_with_bounded_memory(
    raw_server: ServerThread, internal_errors: list[logging.LogRecord], transport: str
) -> None:
    growth = _fuzz_server(raw_server, internal_errors, transport, examples=1000, fast=False)
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.0f} MiB over 1000 examples"
