"""The authors' HTTP `POST /act`: raw model fields (`xvla.serve.codecs.raw`) in a JSON body, whatever format the
WebSocket speaks. Reply: ``{"action": [[A floats] x 30], "server_timing": {...}}``, what the authors' evaluation
clients read (their server sends ``{"action": ...}`` alone).

Every request form the authors' server accepts is accepted:

- **per-field json-numpy strings**, what their clients send: ``{"image0": json_numpy.dumps(img), "proprio":
  json_numpy.dumps(p), "language_instruction": "...", "domain_id": 3, "steps": 10}``; every field but the
  instruction may be such a string (their server runs ``json_numpy.loads(payload[key])`` on each);
- **a whole json-numpy body**, ``json_numpy.dumps({...})`` (arrays as ``{"__numpy__": ...}`` objects), and
  any mix of the two; plain JSON lists for `proprio`;
- `image0`/`image1`/`image2` as an HWC uint8 array **or** as a 1-D uint8 array holding an encoded JPEG or PNG
  file, which is decoded here to **RGB**. (The authors' server decodes it with ``cv2.imdecode`` and never
  converts, so their model gets BGR from such a client: a bug of theirs that is not copied.)
- `image1`, `image2` and `steps` optional (`steps` defaults to the server's ``--steps``);
- `domain_id` and `steps` as a float holding an integer (``3.0``), which the authors' server reads with ``int()``.
  A float with a fraction (``3.5``, which ``int()`` would silently truncate to 3), inf or NaN is refused.

Decoding is for untrusted input: json-numpy objects are decoded here, not by `json_numpy`, and only to plain
numeric dtypes whose byte count matches the shape (never object or structured dtypes, never pickle); encoded
images are read by Pillow as JPEG or PNG only, and their size is checked from the header before any pixel is
decoded. A string where an image is expected (the authors' server would open it as a file path on the server) is
refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from xvla.serve import protocol
from xvla.serve.codecs.base import Prepared
from xvla.serve.codecs.raw import CAMERAS, RawCodec
from xvla.serve.protocol import MAX_IMAGE_SIDE, RequestError

if TYPE_CHECKING:
    from xvla.serve.policy import Policy

# Fields whose value may come as a json-numpy string (the instruction is always a plain string).
ENCODED_FIELDS = (*CAMERAS, "proprio", "domain_id", "steps")
INTEGER_FIELDS = ("domain_id", "steps")  # the authors' server reads these with int()
IMAGE_FORMATS = ("JPEG", "PNG")


def _numpy_hook(obj: dict[str, Any]) -> Any:
    """json-numpy's ``{"__numpy__": base64, "dtype": descr, "shape": [...]}`` -> a checked array or scalar."""
    if "__numpy__" not in obj:
        return obj
    data = obj["__numpy__"]
    if not isinstance(data, str):
        raise RequestError("json-numpy array: '__numpy__' is not a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("json-numpy array: '__numpy__' is not valid base64") from None
    array = protocol.array_from_bytes(raw, obj.get("dtype"), obj.get("shape"))
    return array if array.ndim else array[()]


def json_numpy_loads(data: str | bytes) -> Any:
    """`json_numpy.loads` for untrusted input: plain numeric arrays only (`protocol.array_from_bytes`)."""
    return json.loads(data, object_hook=_numpy_hook)


def decode_image(buffer: np.ndarray, name: str) -> np.ndarray:
    """An encoded JPEG or PNG file (1-D uint8) -> uint8 RGB [H, W, 3], its size checked before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(buffer.tobytes()), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
                raise RequestError(
                    f"{name}: encoded image side must be in [1, {MAX_IMAGE_SIDE}], got {[height, width]}"
                )
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(
            f"{name}: a 1-D uint8 array is read as an encoded image file, and this is not a JPEG or PNG "
            "(send a raw image as uint8 [H, W, 3])"
        ) from None
    except Exception as err:  # truncated or corrupt data: OSError, ValueError, SyntaxError, ...
        raise RequestError(f"{name}: corrupt encoded image ({type(err).__name__}: {err})") from None


def integral_float(value: Any, name: str) -> Any:
    """A float (Python, numpy scalar, or 0-d / 1-element float array) holding an integer -> that int; any other
    float -> RequestError; anything else unchanged (`protocol.integer` checks it and the range)."""
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind == "f":
        value = value.reshape(()).item()
    if not isinstance(value, (float, np.floating)):
        return value
    if not (math.isfinite(value) and float(value).is_integer()):
        raise RequestError(
            f"{name}: expected an integer (a float only when it holds one, e.g. 3.0), got {float(value)!r}"
        )
    return int(value)


def act_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The authors' request forms -> raw fields: json-numpy strings decoded, encoded images decoded to RGB.
    Idempotent (decoded fields pass through), so `decode` applies it to in-process requests too."""
    fields = dict(obj)
    for key in ENCODED_FIELDS:
        if key not in fields:
            continue
        value = fields[key]
        if isinstance(value, (str, bytes)):
            try:
                value = json_numpy_loads(value)
            except RequestError as err:
                raise RequestError(f"{key}: {err}") from None
            except Exception as err:  # JSONDecodeError, RecursionError, UnicodeDecodeError
                raise RequestError(
                    f"{key}: a string here must be json_numpy.dumps(value) ({type(err).__name__}: {err})"
                ) from None
            if isinstance(value, str):  # no field is a string in a string (so decoding twice changes nothing)
                if key in CAMERAS:  # the authors' server would open it as a path on the server
                    raise RequestError(
                        f"{key}: expected an image (uint8 [H, W, 3] or an encoded JPEG/PNG as 1-D uint8), got "
                        "a string; file paths on the server are not read"
                    )
                raise RequestError(f"{key}: expected a number or an array, got a string in a string")
        if key in CAMERAS and isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == np.uint8:
            value = decode_image(value, key)
        if key in INTEGER_FIELDS:
            value = integral_float(value, key)
        fields[key] = value
    return fields


class ActCodec(RawCodec):
    name = "act"

    def loads(self, data: bytes) -> dict[str, Any]:
        try:
            obj = json_numpy_loads(data)
        except Exception as err:
            raise RequestError(f"invalid JSON / json-numpy body: {type(err).__name__}: {err}") from None
        if not isinstance(obj, dict):
            raise RequestError(f"request body must be a JSON object, got {type(obj).__name__}")
        return act_fields(obj)  # here, on the worker thread: image decoding is the costly part

    def decode(self, policy: Policy, obs: Mapping[str, Any], proprio: np.ndarray | None = None) -> Prepared:
        return super().decode(policy, act_fields(obs), proprio)

    def dumps(self, reply: Mapping[str, Any]) -> bytes:
        # numpy arrays become nested lists of floats, as the authors' `action.tolist()`
        return json.dumps(
            {"action": reply["actions"], "server_timing": reply["server_timing"]},
            default=lambda o: o.tolist() if isinstance(o, (np.ndarray, np.generic)) else str(o),
        ).encode()


ACT = ActCodec()
