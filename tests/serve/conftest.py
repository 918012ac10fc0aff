"""Serving fixtures: a tiny random checkpoint (demo preset, 64 px) with a local tokenizer and two robot sources."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from xvla.config import get_preset
from xvla.data.sources import Source
from xvla.model.tokenizer import build_tokenizer
from xvla.model.xvla import XVLA
from xvla.serve.policy import Policy
from xvla.serve.server import ServerConfig, ServerThread

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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve") / "ckpt"
    config = get_preset("demo")
    XVLA(config).save_pretrained(folder)
    build_tokenizer(folder, vocab_size=config.text.vocab_size)
    sources = {s.name: s.to_dict() for s in (arm_source(), arm_source("other_arm", 5, control_hz=5.0))}
    (folder / "sources.json").write_text(json.dumps(sources))
    return folder


@pytest.fixture(scope="session")
def policy(checkpoint: Path) -> Policy:
    torch.set_num_threads(1)
    return Policy.from_checkpoint(checkpoint, source="toy_arm", device="cpu", steps=STEPS, seed=0)


@pytest.fixture(scope="session")
def raw_policy(policy: Policy) -> Policy:
    return policy.with_source(None)


@pytest.fixture(scope="module")
def raw_server(raw_policy: Policy) -> Iterator[ServerThread]:
    with ServerThread(raw_policy, ServerConfig(port=0, max_message_mb=1.0)) as server:
        yield server


@pytest.fixture(scope="module")
def robot_server(policy: Policy) -> Iterator[ServerThread]:
    with ServerThread(
        policy, ServerConfig(port=0, api_key="secret", max_batch=4, max_wait_ms=20.0)
    ) as server:
        yield server
