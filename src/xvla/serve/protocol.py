"""Wire format shared by the server and the client (numpy and msgpack only: no torch here).

WebSocket messages are msgpack with numpy arrays packed exactly as openpi's `openpi_client.msgpack_numpy`
does (`{b"__ndarray__": True, b"data": raw bytes, b"dtype": "<f4", b"shape": [..]}`), so openpi's
`WebsocketClientPolicy` talks to our server unchanged. Decoding is written for untrusted input: only plain
numeric dtypes, the byte count must match the shape, never pickle. (The HTTP `/act` body is json-numpy JSON:
`xvla.serve.codecs.act`, server side only.)

Request checks live here too (`image`, `vector`, ...) so every error names the field and what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

# Plain numeric dtypes only ("<f4", "|u1", "?"...): object, void, string and sub-array dtypes never decode.
_DTYPE_RE = re.compile(r"^[<>|=]?(?:[biuf][1248]|\?)$")
MAX_IMAGE_SIDE = 4096
MAX_INSTRUCTION_CHARS = 2000
# The model computes in float32 (or narrower): a larger value becomes inf there, whatever float64 held.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(ValueError):
    """A request the server rejects; the message names the field and what was expected."""


class NonFiniteActionError(RuntimeError):
    """The model's output for a request holds NaN or inf: it is never sent to a robot."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send an array of dtype {obj.dtype}: only bool/int/float arrays")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot send a scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


def packb(obj: Any) -> bytes:
    """msgpack-encode `obj` (dicts, lists, str, numbers, numpy arrays/scalars), openpi-compatible."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def _dtype(value: Any) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not _DTYPE_RE.match(value):
        raise RequestError(f"array dtype {value!r} is not a plain numeric dtype (e.g. '|u1', '<f4')")
    return np.dtype(value)


def array_from_bytes(data: bytes, dtype: Any, shape: Any) -> np.ndarray:
    """An untrusted (raw bytes, dtype string, shape) triple as a read-only array: a plain numeric dtype, at most
    8 non-negative dimensions, and exactly the byte count they need (shared by msgpack and json-numpy)."""
    dt = _dtype(dtype)
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise RequestError(f"array shape {shape!r} is not a list of non-negative ints")
    if len(shape) > 8:
        raise RequestError(f"array has {len(shape)} dimensions (at most 8)")
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise RequestError(
            f"array of shape {tuple(shape)} and dtype {dt.str} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _decode_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        data = obj.get(b"data")
        if not isinstance(data, bytes):
            raise RequestError("array data is not a msgpack bin field")
        return array_from_bytes(data, obj.get(b"dtype"), obj.get(b"shape"))
    if b"__npgeneric__" in obj:
        value = obj.get(b"data")
        if not isinstance(value, (bool, int, float)):
            raise RequestError(f"numpy scalar data {value!r} is not a number")
        try:
            return _dtype(obj.get(b"dtype")).type(value)
        except OverflowError as err:
            raise RequestError(f"numpy scalar {value!r} does not fit its dtype") from err
    return obj


def unpackb(data: bytes) -> Any:
    """Decode one msgpack message; any malformation raises `RequestError` saying what is wrong."""
    try:
        return msgpack.unpackb(data, object_hook=_decode_hook, raw=False, strict_map_key=False)
    except RequestError:
        raise
    except Exception as err:  # msgpack raises many types (ExtraData, FormatError, ValueError, ...)
        raise RequestError(f"invalid msgpack message: {type(err).__name__}: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# Request field checks (used by Policy for direct calls, the WebSocket and the HTTP endpoint alike)


def image(value: Any, name: str) -> np.ndarray:
    """A uint8 RGB image `[H, W, 3]` of any size up to MAX_IMAGE_SIDE."""
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{name}: expected a uint8 array [H, W, 3], got {type(value).__name__}")
    if value.dtype != np.uint8:
        raise RequestError(f"{name}: expected dtype uint8, got {value.dtype}")
    if value.ndim != 3 or value.shape[2] != 3:
        raise RequestError(f"{name}: expected shape [H, W, 3], got {list(value.shape)}")
    if not (1 <= value.shape[0] <= MAX_IMAGE_SIDE and 1 <= value.shape[1] <= MAX_IMAGE_SIDE):
        raise RequestError(
            f"{name}: image side must be in [1, {MAX_IMAGE_SIDE}], got {list(value.shape[:2])}"
        )
    return (
        value if value.flags.writeable else value.copy()
    )  # decoded buffers are read-only; torch wants writable


def vector(value: Any, name: str, dim: int, max_abs: float = FLOAT32_MAX, hint: str = "") -> np.ndarray:
    """A finite real vector of length `dim` (array or list) with every |x| <= `max_abs`, as float64 `[dim]`;
    `hint` ends the out-of-range message (why the bound)."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value):
            raise RequestError(f"{name}: expected a list of {dim} numbers")
        try:
            value = np.asarray(value, dtype=np.float64)
        except OverflowError:  # a JSON integer such as 10**400
            raise RequestError(f"{name}: a number is too large to be a float") from None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise RequestError(f"{name}: expected a numeric array of shape [{dim}], got {type(value).__name__}")
    if value.shape != (dim,):
        raise RequestError(f"{name}: expected shape [{dim}], got {list(value.shape)}")
    out = value.astype(np.float64)
    bounded(out, name, max_abs, hint)
    return out


def bounded(values: np.ndarray, name: str, max_abs: float, hint: str = "") -> None:
    """Refuse NaN, inf and any entry with |x| > `max_abs`, naming the first offending index."""
    if not np.isfinite(values).all():
        raise RequestError(f"{name}: contains NaN or infinite values")
    too_big = np.flatnonzero(np.abs(values) > max_abs)
    if too_big.size:
        i = int(too_big[0])
        raise RequestError(
            f"{name}[{i}] = {values.flat[i]:.4g} is outside [-{max_abs:.4g}, {max_abs:.4g}]{hint}"
        )


def text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name}: not valid UTF-8") from None
    if not isinstance(value, str):
        raise RequestError(f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_INSTRUCTION_CHARS:
        raise RequestError(f"{name}: longer than {MAX_INSTRUCTION_CHARS} characters")
    return value


def integer(value: Any, name: str, low: int, high: int) -> int:
    """An int in [low, high] (a numpy integer scalar or 0-d/1-element array is accepted)."""
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu":
        value = value.reshape(()).item()
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name}: expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise RequestError(f"{name}: {value} is out of range [{low}, {high}]")
    return value


def required(obs: Mapping[str, Any], key: str) -> Any:
    """`obs[key]`, or a RequestError naming the missing field."""
    if key not in obs:
        raise RequestError(f"missing field {key!r}")
    return obs[key]
