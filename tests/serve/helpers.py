"""Serving test helpers: two robot sources, observations in both request formats, a slow policy wrapper."""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from xvla.data.sources import Source
from xvla.serve.policy import Policy

STEPS = 2  # denoising steps in tests: the sampler loop is covered, the time is not spent


def arm_source(name: str = "toy_arm", domain_id: int = 3, **changes: object) -> Source:
    """Single arm: state [xyz, quat_xyzw, gripper 0..0.08 m]; actions [dxyz (cm), d axis-angle, binary gripper]
    at 10 Hz over a 2 s horizon; a front camera and an upside-down wrist camera."""
    spec = {
        "name": name,
        "domain_id": domain_id,
        "path": "unused",
        "rot6d_layout": "contiguous",
        "control_hz": 10.0,
        "horizon_s": 2.0,
        "cameras": [
            {"key": "observation.images.front"},
            {"key": "observation.images.wrist", "flip": "rot180"},
        ],
        "state": {
            "key": "observation.state",
            "dim": 8,
            "arms": [
                {
                    "position": [0, 1, 2],
                    "rotation": [3, 4, 5, 6],
                    "gripper": 7,
                    "pose": {"rotation": "quat_xyzw"},
                    "gripper_convention": {"open": 0.08, "closed": 0.0},
                }
            ],
        },
        "action": {
            "key": "action",
            "dim": 7,
            "arms": [
                {
                    "position": [0, 1, 2],
                    "rotation": [3, 4, 5],
                    "gripper": 6,
                    "pose": {"rotation": "axis_angle", "mode": "delta", "position_unit": "cm"},
                    "gripper_convention": {"open": -1.0, "closed": 1.0, "binary": True},
                }
            ],
        },
        **changes,
    }
    return Source.from_dict(spec)


def robot_obs(
    rng: np.random.Generator, front: tuple[int, int] = (48, 80), wrist: tuple[int, int] = (64, 64)
) -> dict:
    """An observation as the toy arm's computer sends it (native state, images of any size)."""
    quat = rng.standard_normal(4)
    quat /= np.linalg.norm(quat)
    state = np.concatenate([rng.uniform(-0.5, 0.5, 3), quat, [0.04]]).astype(np.float32)
    return {
        "images": {
            "observation.images.front": rng.integers(0, 256, (*front, 3), dtype=np.uint8),
            "observation.images.wrist": rng.integers(0, 256, (*wrist, 3), dtype=np.uint8),
        },
        "state": state,
        "instruction": "pick up the red block",
    }


def raw_obs(rng: np.random.Generator) -> dict:
    """A request in the authors' /act fields."""
    return {
        "image0": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "image1": rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
        "language_instruction": "put the cup on the plate",
        "proprio": rng.standard_normal(20).astype(np.float32),
        "domain_id": 2,
    }


class SlowPolicy:
    """Wraps a policy; each forward pass takes at least `delay_s` (stands in for a big model)."""

    def __init__(self, inner: Policy, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.metadata = inner.metadata
        self.prepare, self.codec = inner.prepare, inner.codec

    def run(self, prepared: list) -> list:  # noqa: ANN001
        time.sleep(self.delay_s)
        return self.inner.run(prepared)


def nan_policy(policy: Policy) -> Policy:
    """`policy` with a copy of its model whose final norm bias is NaN: every action it computes is NaN."""
    model = copy.deepcopy(policy.model)
    with torch.no_grad():
        dict(model.named_parameters())["transformer.norm.bias"].fill_(float("nan"))
    return Policy(model, policy.tokenizer, source=policy.source, sources=policy.sources, config=policy.config)


def fixture_dir(name: str) -> Path:
    """tests/conftest.py's `fixture_dir` (skips when ../shared is absent), loaded by path: a sibling test folder's
    conftest.py may have taken the module name `conftest`."""
    spec = importlib.util.spec_from_file_location(
        "_xvla_root_conftest", Path(__file__).resolve().parents[1] / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fixture_dir(name)
