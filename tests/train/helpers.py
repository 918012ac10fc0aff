"""Helpers for training tests: tiny LeRobot v3 datasets written in tmp, a tiny model, short run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xvla.configio import apply_overrides, from_dict, to_dict
from xvla.data.lerobot_writer import LeRobotV3Writer
from xvla.train.config import AdaptConfig, TrainConfig

SIZE = 32  # stored image side (the model resizes to 64)
ARMS = [{"position": [0, 1, 2], "rotation": [3, 4, 5, 6], "gripper": 7}]  # x y z | quat xyzw | gripper
# A small model: 64 px views (5 tokens each), 2-layer head of width 64, 4 domains.
MODEL_OVERRIDES = {
    "image_size": 64,
    "num_views": 2,
    "head.hidden_size": 64,
    "head.depth": 2,
    "head.num_heads": 4,
    "head.num_domains": 4,
    "head.len_soft_prompts": 4,
    "head.dropout": 0.0,
    "text.encoder_layers": 1,
    "text.vocab_size": 512,
}


def _pose(angle: float, f: int, length: int) -> np.ndarray:
    """x, y, z, quaternion xyzw (a tilt about x), gripper (closes half-way)."""
    half = 0.5 * (0.3 * np.sin(angle))
    xyz = [0.4 + 0.1 * np.cos(angle), 0.1 * np.sin(angle), 0.2 + 0.01 * f]
    return np.array([*xyz, np.sin(half), 0, 0, np.cos(half), float(f > length // 2)], dtype=np.float32)


def write_dataset(
    root: Path, *, episodes: int, length: int, phase: float, action_x: float | None = None
) -> Path:
    """Episodes of a gripper moving on a circle arc (start angle set by episode and `phase`); the action is the
    next frame's pose; the image shows a square whose colour encodes the episode and position the frame.
    `action_x`: every action's x position instead (absurd targets: a dataset in the wrong units)."""
    features = {
        "observation.images.front": {"dtype": "image", "shape": [SIZE, SIZE, 3]},
        "observation.state": {"dtype": "float32", "shape": [8], "names": None},
        "action": {"dtype": "float32", "shape": [8], "names": None},
    }
    with LeRobotV3Writer(root, fps=10, features=features) as writer:
        for ep in range(episodes):
            colour = np.array([60 + 60 * ep, 200 - 40 * ep, 120], dtype=np.uint8)
            for f in range(length):
                angle = phase + 0.5 * ep + 0.08 * f
                img = np.full((SIZE, SIZE, 3), 20, dtype=np.uint8)
                x0 = (2 * f) % (SIZE - 8)
                img[8:16, x0 : x0 + 8] = colour
                frame = {
                    "observation.images.front": img,
                    "observation.state": _pose(angle, f, length),
                    "action": _pose(angle + 0.08, min(f + 1, length - 1), length),
                }
                if action_x is not None:
                    frame["action"][0] = action_x
                writer.add_frame(frame, task=f"task {ep % 2}")
            writer.save_episode()
        writer.finalize()
    return root


def arc_datasets(root: Path) -> dict[str, Path]:
    """The two small sources most training tests use: arc_a (4 episodes) and arc_b (3), 24 frames each."""
    return {
        "arc_a": write_dataset(root / "arc_a", episodes=4, length=24, phase=0.0),
        "arc_b": write_dataset(root / "arc_b", episodes=3, length=24, phase=2.0),
    }


def source_dict(name: str, domain_id: int, path: Path, **changes: Any) -> dict[str, Any]:
    return {
        "name": name,
        "domain_id": domain_id,
        "path": str(path),
        "rot6d_layout": "contiguous",
        "state": {"key": "observation.state", "dim": 8, "arms": ARMS},
        "action": {"key": "action", "dim": 8, "arms": ARMS},
        "control_hz": 10,
        "cameras": [{"key": "observation.images.front"}],
        "horizon_s": 1.0,
        "val_count": 1,
        **changes,
    }


def mixture(datasets: dict[str, Path], names: tuple[str, ...] = ("arc_a", "arc_b")) -> dict[str, Any]:
    return {"sources": [source_dict(n, i, datasets[n]) for i, n in enumerate(names)]}


def make_config(out: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> TrainConfig:
    """A short CPU run: batch 4, 6 steps, checkpoints and validation every 3 steps, no TensorBoard."""
    base = {
        "output_dir": str(out),
        "model": {"preset": "demo", "overrides": MODEL_OVERRIDES},
        "data": {"mixture": data},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "prompt_warmup_steps": 2},
        "checkpoint": {"every": 3, "keep_last": 2},
        "val": {"every": 3, "batches": 1, "sample_steps": 2},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "steps": 6,
        "batch_size": 4,
        "cpu": True,
        # fp32 on every CPU: tests compare runs up to float summation order, which bf16 (precision "auto" on a CPU
        # with bf16 instructions) would swamp; the precision tests set it themselves
        "precision": "no",
    }
    return from_dict(TrainConfig, apply_overrides(TrainConfig, base, overrides))


def adapt_config(out: Path, base: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> AdaptConfig:
    """AdaptConfig around `make_config`: 2 prompt-only steps, then 2 more of `mode`."""
    train_cfg = to_dict(make_config(out, data, ("steps=4", "checkpoint.every=2", "val.every=4")))
    train_cfg["model"] = {"checkpoint": str(base)}
    base_dict = {"train": train_cfg, "retrieval_batches": 1}
    return from_dict(AdaptConfig, apply_overrides(AdaptConfig, base_dict, overrides))
