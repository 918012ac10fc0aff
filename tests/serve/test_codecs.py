"""Request formats, one at a time: bytes -> fields -> model inputs, anchors -> reply -> bytes."""

from __future__ import annotations

import json

import json_numpy
import numpy as np
import pytest
import torch
from openpi_client import msgpack_numpy

from xvla.serve.codecs import ACT, RAW, SOURCE, Codec
from xvla.serve.policy import Policy
from xvla.serve.protocol import RequestError

from .helpers import raw_obs, robot_obs

TIMING = {"prep_ms": 1.0, "queue_ms": 2.0, "infer_ms": 3.0, "batch_size": 1}


def _same_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def _anchors(policy: Policy) -> np.ndarray:
    shape = (policy.model.config.num_actions, policy.model.action_space.dim)
    return np.random.default_rng(0).uniform(-0.1, 0.1, shape).astype(np.float32)


def test_the_policy_speaks_the_format_of_its_source(policy: Policy, raw_policy: Policy) -> None:
    assert policy.codec is SOURCE and raw_policy.codec is RAW
    assert policy.metadata["protocol"] == "source" and raw_policy.metadata["protocol"] == "raw"


def test_source_codec(policy: Policy) -> None:
    obs = robot_obs(np.random.default_rng(0))
    fields = SOURCE.loads(msgpack_numpy.packb(obs))  # what openpi's client sends
    prepared = SOURCE.decode(policy, fields)
    assert prepared.codec is SOURCE and prepared.source is policy.source
    _same_inputs(prepared.inputs, policy.prepare(obs).inputs)
    reply = SOURCE.encode(prepared, _anchors(policy))
    assert reply["actions"].shape == (20, 7) and reply["actions"].dtype == np.float32  # 2 s at 10 Hz
    assert reply["canonical"].shape == (20, 20) and reply["anchors"].shape == (30, 20)
    assert reply["domain"] == "toy_arm"
    back = msgpack_numpy.unpackb(SOURCE.dumps({**reply, "server_timing": TIMING}))
    np.testing.assert_array_equal(back["actions"], reply["actions"])
    assert back["server_timing"] == TIMING
    meta = SOURCE.metadata(policy)
    assert meta["chunk_length"] == 20 and meta["state_dim"] == 8 and meta["control_hz"] == 10.0
    with pytest.raises(RequestError, match="missing field 'image0'"):
        RAW.decode(policy, fields)  # the same bytes are not a raw request


def test_raw_codec(raw_policy: Policy) -> None:
    obs = raw_obs(np.random.default_rng(1))
    prepared = RAW.decode(raw_policy, RAW.loads(msgpack_numpy.packb(obs)))
    assert prepared.codec is RAW and prepared.source is None
    np.testing.assert_array_equal(prepared.proprio, obs["proprio"])
    anchors = _anchors(raw_policy)
    assert RAW.encode(prepared, anchors).keys() == {"actions"}
    back = msgpack_numpy.unpackb(RAW.dumps({**RAW.encode(prepared, anchors), "server_timing": TIMING}))
    np.testing.assert_array_equal(back["actions"], anchors)
    meta = RAW.metadata(raw_policy)
    assert meta["cameras"] == ["image0", "image1", "image2"] and meta["proprio_dim"] == 20
    with pytest.raises(RequestError, match="invalid msgpack"):
        RAW.loads(b"\xc1")


def test_act_codec(policy: Policy, raw_policy: Policy) -> None:
    """The authors' /act: raw fields as json-numpy, whatever the policy's own format; `action` in the reply."""
    obs = raw_obs(np.random.default_rng(2))
    fields = ACT.loads(json_numpy.dumps(obs).encode())
    for p in (policy, raw_policy):
        _same_inputs(ACT.decode(p, fields).inputs, RAW.decode(raw_policy, obs).inputs)
    prepared = ACT.decode(policy, fields)
    anchors = _anchors(policy)
    reply = json.loads(ACT.dumps({**ACT.encode(prepared, anchors), "server_timing": TIMING}))
    assert reply.keys() == {"action", "server_timing"} and reply["server_timing"] == TIMING
    np.testing.assert_allclose(reply["action"], anchors)
    with pytest.raises(RequestError, match="invalid JSON / json-numpy body"):
        ACT.loads(b"{not json")
    with pytest.raises(RequestError, match="request body must be a JSON object, got list"):
        ACT.loads(b"[1, 2]")


@pytest.mark.parametrize("codec", [SOURCE, RAW, ACT], ids=lambda c: c.name)
def test_an_override_proprio_replaces_the_requests(codec: Codec, policy: Policy) -> None:
    """Open-loop mode feeds the last executed predicted pose instead of the request's."""
    obs = robot_obs(np.random.default_rng(3)) if codec is SOURCE else raw_obs(np.random.default_rng(3))
    override = np.full(20, 0.25)
    prepared = codec.decode(policy, obs, override)
    assert prepared.proprio is override
    assert prepared.inputs["proprio"].numpy().tolist() == [0.25] * 20


# ----------------------------------------------------------------------------------------------------------
# /act: every request form the authors' server accepts (issue 15, item 1)


def _authors_fields(obs: dict) -> dict:
    """A request the way the authors' clients build it: each array a `json_numpy.dumps` string."""
    return {k: json_numpy.dumps(v) if isinstance(v, np.ndarray) else v for k, v in obs.items()}


def _encoded(image: np.ndarray, fmt: str) -> np.ndarray:
    """`image` as an encoded file in a 1-D uint8 array (what `cv2.imencode` gives the authors' clients)."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt, quality=95) if fmt == "JPEG" else Image.fromarray(
        image
    ).save(out, format=fmt)
    return np.frombuffer(out.getvalue(), dtype=np.uint8)


def _two_colour_image() -> np.ndarray:
    """Left half pure red, right half pure blue: RGB and BGR differ, and so do the two halves."""
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[:, :24, 0] = 255
    image[:, 24:, 2] = 255
    return image


def test_act_per_field_json_numpy_strings(raw_policy: Policy) -> None:
    """The authors' clients: `{"image0": json_numpy.dumps(img), ...}` in a plain JSON body."""
    obs = raw_obs(np.random.default_rng(4))
    body = json.dumps({**_authors_fields(obs), "steps": 3}).encode()
    prepared = ACT.decode(raw_policy, ACT.loads(body))
    _same_inputs(prepared.inputs, RAW.decode(raw_policy, obs).inputs)
    assert prepared.steps == 3 and prepared.codec is ACT
    # proprio as json_numpy.dumps(list), domain_id and steps as json-numpy scalars, fields mixed with a whole
    # json-numpy body: all decode to the same request
    mixed = {
        **_authors_fields(obs),
        "image1": obs["image1"],
        "proprio": json_numpy.dumps(obs["proprio"].tolist()),
        "domain_id": json_numpy.dumps(np.int64(2)),
        "steps": json_numpy.dumps(3),
    }
    again = ACT.decode(raw_policy, ACT.loads(json_numpy.dumps(mixed).encode()))
    torch.testing.assert_close(again.inputs, prepared.inputs, rtol=0, atol=1e-7)
    assert again.steps == 3


def test_act_optional_fields(raw_policy: Policy) -> None:
    """image1, image2 and steps may be left out, as on the authors' server."""
    obs = raw_obs(np.random.default_rng(5))
    del obs["image1"]
    prepared = ACT.decode(raw_policy, ACT.loads(json.dumps(_authors_fields(obs)).encode()))
    _same_inputs(prepared.inputs, RAW.decode(raw_policy, obs).inputs)
    assert prepared.steps == raw_policy.config.steps
    three = {**obs, "image1": obs["image0"], "image2": obs["image0"][:16]}
    assert ACT.decode(raw_policy, ACT.loads(json.dumps(_authors_fields(three)).encode())).steps == 2


def test_act_integer_fields_accept_integral_floats(raw_policy: Policy) -> None:
    """`"domain_id": 2.0` (and `steps`), which the authors' server reads with int(), is the request with 2."""
    obs = raw_obs(np.random.default_rng(10))
    expected = RAW.decode(raw_policy, {**obs, "steps": 3})
    for domain_id, steps in (
        (2.0, 3.0),
        (json_numpy.dumps(np.float32(2.0)), json_numpy.dumps(np.float64(3.0))),
    ):
        body = json.dumps({**_authors_fields(obs), "domain_id": domain_id, "steps": steps}).encode()
        fields = ACT.loads(body)
        assert type(fields["domain_id"]) is int and type(fields["steps"]) is int
        prepared = ACT.decode(raw_policy, fields)
        _same_inputs(prepared.inputs, expected.inputs)
        assert prepared.steps == 3
    # in-process requests go through the same decoding
    assert ACT.decode(raw_policy, {**obs, "domain_id": np.array([2.0])}).inputs["domain_id"].item() == 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_act_encoded_images_decode_to_rgb(raw_policy: Policy, fmt: str) -> None:
    """A 1-D uint8 image0/image1 is an encoded file, decoded in RGB (the authors' server would give BGR)."""
    image = _two_colour_image()
    obs = {
        **raw_obs(np.random.default_rng(6)),
        "image0": _encoded(image, fmt),
        "image1": _encoded(image, fmt),
    }
    fields = ACT.loads(json.dumps(_authors_fields(obs)).encode())
    for key in ("image0", "image1"):
        decoded = fields[key]
        assert decoded.shape == (32, 48, 3) and decoded.dtype == np.uint8
        if fmt == "PNG":
            np.testing.assert_array_equal(decoded, image)
        else:  # lossy, but red stays left and blue right
            assert decoded[:, :20, 0].mean() > 200 and decoded[:, :20, 2].mean() < 50
            assert decoded[:, 28:, 2].mean() > 200 and decoded[:, 28:, 0].mean() < 50
    raw = {**obs, "image0": fields["image0"], "image1": fields["image1"]}
    _same_inputs(ACT.decode(raw_policy, fields).inputs, RAW.decode(raw_policy, raw).inputs)
    # grey and RGBA PNGs become RGB as cv2.IMREAD_COLOR does
    grey = _encoded(image[..., 0], "PNG")
    assert ACT.loads(json.dumps({"image0": json_numpy.dumps(grey)}).encode())["image0"].shape == (32, 48, 3)


def _noise_image() -> np.ndarray:
    return np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _array_object(data: bytes, dtype: str, shape: list[int]) -> dict:
    import base64

    return {"__numpy__": base64.b64encode(data).decode(), "dtype": dtype, "shape": shape}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image0", json_numpy.dumps("/etc/passwd"), "image0: expected an image .* file paths on the server"),
        ("image0", "{not json", "image0: a string here must be json_numpy.dumps"),
        ("image0", json_numpy.dumps(np.arange(64, dtype=np.uint8)), "image0: .* not a JPEG or PNG"),
        ("image1", json_numpy.dumps(_encoded(_noise_image(), "PNG")[:600]), "image1: corrupt encoded image"),
        ("image0", json.dumps(_array_object(b"\0" * 8, "|O", [1])), "image0: .*'|O' is not a plain numeric"),
        ("image0", json.dumps(_array_object(b"\0" * 8, "<f4", [4])), "image0: .*needs 16 bytes, got 8"),
        (
            "image0",
            json.dumps({"__numpy__": "@@", "dtype": "|u1", "shape": [1]}),
            "image0: .*not valid base64",
        ),
        ("proprio", json_numpy.dumps(np.zeros(3)), r"proprio: expected shape \[20\]"),
        (
            "domain_id",
            json_numpy.dumps("3"),
            "domain_id: expected a number or an array, got a string in a string",
        ),
        # the authors' int() would truncate 3.5 to 3, or fail on inf / NaN
        (
            "domain_id",
            3.5,
            r"domain_id: expected an integer \(a float only when it holds one, e.g. 3.0\), got 3.5",
        ),
        ("domain_id", json_numpy.dumps(np.float32(2.25)), "domain_id: expected an integer .*got 2.25"),
        ("domain_id", float("inf"), "domain_id: expected an integer .*got inf"),
        ("domain_id", float("nan"), "domain_id: expected an integer .*got nan"),
        ("domain_id", 1e9, r"domain_id: 1000000000 is out of range \[0, 7\]"),
        ("domain_id", -1.0, r"domain_id: -1 is out of range \[0, 7\]"),
        ("steps", 2.5, "steps: expected an integer .*got 2.5"),
    ],
)
def test_act_bad_fields_are_named(raw_policy: Policy, field: str, value: str, message: str) -> None:
    body = json.dumps({**_authors_fields(raw_obs(np.random.default_rng(7))), field: value}).encode()
    with pytest.raises(RequestError, match=message):
        ACT.decode(raw_policy, ACT.loads(body))


def test_act_encoded_image_size_is_checked_before_decoding() -> None:
    """A PNG header claiming 5000 x 1 pixels is refused from the header (decompression bombs never expand)."""
    wide = _encoded(np.zeros((1, 5000, 3), dtype=np.uint8), "PNG")
    with pytest.raises(
        RequestError, match=r"image0: encoded image side must be in \[1, 4096\], got \[1, 5000\]"
    ):
        ACT.loads(json.dumps({"image0": json_numpy.dumps(wide)}).encode())
    objects = json.dumps({"image0": _array_object(b"\0" * 8, "|O", [1])}).encode()
    with pytest.raises(RequestError, match="invalid JSON / json-numpy body: .*not a plain numeric dtype"):
        ACT.loads(objects)  # a whole-body object array is refused as well


def test_act_reply_is_the_authors_format(raw_policy: Policy) -> None:
    """`{"action": [[float] * A] * 30}` as the authors' `action.tolist()`, plus our `server_timing`."""
    prepared = ACT.decode(raw_policy, raw_obs(np.random.default_rng(8)))
    anchors = _anchors(raw_policy)
    reply = json.loads(ACT.dumps({**ACT.encode(prepared, anchors), "server_timing": TIMING}))
    assert list(reply) == ["action", "server_timing"]
    assert len(reply["action"]) == 30 and all(len(row) == 20 for row in reply["action"])
    assert all(type(x) is float for row in reply["action"] for x in row)
    assert reply["action"] == anchors.tolist()
