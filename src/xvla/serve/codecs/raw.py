"""Raw model requests: the model's own inputs under the authors' field names (`xvla serve` without `--source`).

Request: ``image0`` (required), ``image1``, ``image2`` (uint8 [H, W, 3], in order), ``language_instruction``,
``proprio`` (canonical [P]), ``domain_id``, optional ``steps``. Reply: ``actions`` = the 30 canonical anchors
[30, A].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from xvla.serve import protocol
from xvla.serve.codecs.base import MAX_PROPRIO_ABS, PROPRIO_HINT, Codec, Prepared, steps
from xvla.serve.protocol import RequestError

if TYPE_CHECKING:
    from xvla.serve.policy import Policy

CAMERAS = ("image0", "image1", "image2")


class RawCodec(Codec):
    name = "raw"

    def decode(self, policy: Policy, obs: Mapping[str, Any], proprio: np.ndarray | None = None) -> Prepared:
        cfg = policy.model.config
        images = [protocol.image(protocol.required(obs, "image0"), "image0")]
        for i, key in enumerate(CAMERAS[1:], start=1):
            if obs.get(key) is None:
                continue
            if i >= cfg.num_views:
                raise RequestError(f"{key}: this model takes {cfg.num_views} view(s)")
            if len(images) != i:
                raise RequestError(
                    f"{key}: given without {CAMERAS[i - 1]} (views fill image0, image1, image2 in order)"
                )
            images.append(protocol.image(obs[key], key))
        instruction = protocol.text(protocol.required(obs, "language_instruction"), "language_instruction")
        if proprio is None:
            proprio = protocol.vector(
                protocol.required(obs, "proprio"), "proprio", cfg.proprio_dim, MAX_PROPRIO_ABS, PROPRIO_HINT
            )
        domain_id = protocol.integer(
            protocol.required(obs, "domain_id"), "domain_id", 0, policy.model.num_domains - 1
        )
        inputs = policy.model_inputs(images, instruction, proprio, domain_id)
        return Prepared(inputs, steps(policy, obs), proprio, self)

    def encode(self, prepared: Prepared, anchors: np.ndarray) -> dict[str, Any]:
        return {"actions": anchors}

    def metadata(self, policy: Policy) -> dict[str, Any]:
        cfg = policy.model.config
        return {
            "cameras": list(CAMERAS[: cfg.num_views]),
            "required_cameras": ["image0"],
            "proprio_dim": cfg.proprio_dim,
            "action_space": cfg.action_space,
            "action_dim": policy.model.action_space.dim,
            "chunk_length": cfg.num_actions,
            "control_hz": None,
        }


RAW = RawCodec()
