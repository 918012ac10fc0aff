"""Wire format: openpi compatibility both ways, and safe decoding of untrusted bytes."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openpi_client import msgpack_numpy

from xvla.serve import protocol
from xvla.serve.protocol import RequestError


def test_openpi_roundtrip_both_ways() -> None:
    obs = {
        "image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
        "state": np.linspace(-1, 1, 7, dtype=np.float32),
        "scalar": np.float64(2.5),
        "prompt": "pick",
        "nested": {"x": np.int64(3)},
    }
    ours = protocol.unpackb(msgpack_numpy.packb(obs))
    theirs = msgpack_numpy.unpackb(protocol.packb(obs))
    for decoded in (ours, theirs):
        np.testing.assert_array_equal(decoded["image"], obs["image"])
        assert decoded["image"].dtype == np.uint8
        np.testing.assert_array_equal(decoded["state"], obs["state"])
        assert decoded["scalar"] == 2.5 and decoded["prompt"] == "pick" and decoded["nested"]["x"] == 3
    assert protocol.packb(obs) == msgpack_numpy.packb(obs)  # byte-identical encoding


def _array(dtype: object, shape: object, data: object) -> bytes:
    return msgpack.packb(
        {"a": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}}, use_bin_type=True
    )


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (_array("|O", [1], b"\0" * 8), "dtype"),
        (_array("|V8", [1], b"\0" * 8), "dtype"),
        (_array("(1000000,)f4", [1], b"\0" * 4), "dtype"),
        (_array("<f4", [4], b"\0" * 8), "needs 16 bytes"),
        (_array("<f4", [-1], b""), "shape"),
        (_array("<f4", "x", b""), "shape"),
        (_array("<f4", [1], "not bytes"), "bin"),
        (b"\xc1", "invalid msgpack"),
        (b"\x92\x01", "invalid msgpack"),  # truncated array
        (msgpack.packb({"a": 1}) + b"\x00", "invalid msgpack"),  # trailing data
    ],
)
def test_malformed_messages_are_named(message: bytes, needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        protocol.unpackb(message)


def test_field_checks_name_the_field() -> None:
    with pytest.raises(RequestError, match="image0: expected dtype uint8"):
        protocol.image(np.zeros((4, 4, 3), np.float32), "image0")
    with pytest.raises(RequestError, match=r"wrist: expected shape \[H, W, 3\]"):
        protocol.image(np.zeros((4, 4), np.uint8), "wrist")
    with pytest.raises(RequestError, match="proprio: contains NaN"):
        protocol.vector(np.full(20, np.nan), "proprio", 20)
    with pytest.raises(RequestError, match=r"proprio: expected shape \[20\]"):
        protocol.vector(np.zeros(7), "proprio", 20)
    with pytest.raises(RequestError, match=r"domain_id: 99 is out of range"):
        protocol.integer(99, "domain_id", 0, 7)
    with pytest.raises(RequestError, match="missing field 'state'"):
        protocol.required({}, "state")
    # Finite in float64, inf in the float32 the model computes in.
    with pytest.raises(RequestError, match=r"state\[1\] = -1e\+39 is outside \[-3.403e\+38, 3.403e\+38\]"):
        protocol.vector(np.array([0.0, -1e39]), "state", 2)
    with pytest.raises(RequestError, match="proprio: a number is too large to be a float"):
        protocol.vector([10**400, 0], "proprio", 2)  # what json decodes `1e400`-sized integers to
    with pytest.raises(RequestError, match=r"proprio\[0\] = 20 is outside \[-10, 10\] \(why\)"):
        protocol.vector([20, 0], "proprio", 2, max_abs=10.0, hint=" (why)")
    np.testing.assert_array_equal(protocol.vector([1, 2.5], "v", 2), [1.0, 2.5])
    assert protocol.integer(np.array([3]), "domain_id", 0, 7) == 3


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_request_error(data: bytes) -> None:
    with contextlib.suppress(RequestError):
        protocol.unpackb(data)


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_arbitrary_msgpack_structures_never_crash_the_decoder(value: object) -> None:
    with contextlib.suppress(RequestError):
        protocol.unpackb(msgpack.packb(value, use_bin_type=True))
