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
