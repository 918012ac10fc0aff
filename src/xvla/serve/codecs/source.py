"""Source requests: a robot described by `xvla.data.sources.Source`, in its own units (`xvla serve --source`).

Request: ``{"images": {camera_key: uint8 [H, W, 3]}, "state": native [S], "instruction": str, "domain": optional
source name, "steps": optional int}``. The state goes to canonical space through the Source and images are flipped
as it says. Reply: the 30 canonical anchors, which span the source's horizon, resampled to
``round(horizon_s * control_hz)`` steps at the control rate (the training targets' interpolation) and converted by
`Source.canonical_to_native`: ``actions`` [K, native_dim], ``anchors`` [30, A], ``canonical`` [K, A], ``domain``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from xvla.data.anchors import resample_chunk
from xvla.data.sources import Source
from xvla.serve import protocol
from xvla.serve.codecs.base import MAX_PROPRIO_ABS, PROPRIO_HINT, Codec, Prepared, steps
from xvla.serve.protocol import RequestError

if TYPE_CHECKING:
    from xvla.serve.policy import Policy


class SourceCodec(Codec):
    name = "source"

    def decode(self, policy: Policy, obs: Mapping[str, Any], proprio: np.ndarray | None = None) -> Prepared:
        source = _request_source(policy, obs)
        state = protocol.vector(protocol.required(obs, "state"), "state", source.state.dim)
        images_in = protocol.required(obs, "images")
        if not isinstance(images_in, Mapping):
            raise RequestError(
                f"images: expected a map camera key -> uint8 [H, W, 3], got {type(images_in).__name__}"
            )
        keys = [c.key for c in source.cameras]
        unknown = sorted(set(map(str, images_in)) - set(keys))
        if unknown:
            raise RequestError(f"images: unknown camera(s) {unknown}; source {source.name!r} has {keys}")
        images = []
        for cam in source.cameras:
            if cam.key not in images_in:
                raise RequestError(
                    f"images: missing camera {cam.key!r} (source {source.name!r} needs {keys})"
                )
            images.append(cam.apply(protocol.image(images_in[cam.key], f"images[{cam.key!r}]")))
        if "instruction" in obs or source.instruction is None:
            instruction = protocol.text(protocol.required(obs, "instruction"), "instruction")
        else:
            instruction = source.instruction
        try:
            canonical = source.state_to_canonical(state) if proprio is None else proprio
        except ValueError as err:  # e.g. a zero quaternion
            raise RequestError(f"state: {err}") from None
        if not np.isfinite(canonical).all():
            raise RequestError("state: gives a non-finite canonical pose (check units and rotation format)")
        protocol.bounded(canonical, "state: canonical proprio", MAX_PROPRIO_ABS, PROPRIO_HINT)
        inputs = policy.model_inputs(images, instruction, canonical, source.domain_id, source.missing_views)
        return Prepared(inputs, steps(policy, obs), canonical, self, source, state)

    def encode(self, prepared: Prepared, anchors: np.ndarray) -> dict[str, Any]:
        source, state = prepared.source, prepared.state
        assert source is not None and state is not None
        canonical = resample_anchors(source, prepared.proprio, anchors)
        return {
            "actions": source.canonical_to_native(canonical, state).astype(np.float32),
            "anchors": anchors,
            "canonical": canonical.astype(np.float32),
            "domain": source.name,
        }

    def metadata(self, policy: Policy) -> dict[str, Any]:
        s = policy.source
        assert s is not None and s.action is not None
        return {
            "domain": s.name,
            "cameras": [c.key for c in s.cameras],
            "missing_views": s.missing_views,
            "state_key": s.state.key,
            "state_dim": s.state.dim,
            "action_key": s.action.key,
            "action_dim": s.action.dim,
            "action_convention": s.to_dict()["action"],
            "chunk_length": chunk_length(s),
            "control_hz": s.control_hz,
            "horizon_s": s.horizon_s,
            "instruction": s.instruction,
        }


def _request_source(policy: Policy, obs: Mapping[str, Any]) -> Source:
    """The policy's source, or the one the optional `domain` field names."""
    name = obs.get("domain")
    if name is None:
        assert policy.source is not None
        return policy.source
    name = protocol.text(name, "domain")
    if name not in policy.sources:
        raise RequestError(f"domain: unknown domain {name!r}; known domains: {sorted(policy.sources)}")
    source = policy.sources[name]
    if source is not policy.source:
        try:
            policy.check_source(source)
        except ValueError as err:
            raise RequestError(f"domain: {err}") from None
    return source


def chunk_length(source: Source) -> int:
    """Native actions per reply: the source's horizon at its control rate."""
    return max(1, round(source.horizon_s * source.control_hz))


def resample_anchors(source: Source, proprio: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Canonical anchors [30, P] spanning `source.horizon_s` (the proprio at 0) -> canonical poses [K, P] at the
    control rate, K = horizon * hz: the training interpolation (`anchors.resample_chunk`) with the source's
    conventions."""
    return resample_chunk(
        np.asarray(proprio)[: anchors.shape[1]],
        anchors,
        source.horizon_s,
        source.control_hz,
        num_arms=source.num_arms,
        rot6d_layout=source.rot6d_layout,
        binary_grippers=source.binary_grippers,
    )


SOURCE = SourceCodec()
