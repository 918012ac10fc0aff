"""xvla.train: `train(cfg)` and `adapt(cfg)` on accelerate, their configs, optimiser recipe and checkpoints.

`from xvla.train import train, TrainConfig, AdaptConfig` loads the heavy modules on first use; `adapt` is
`xvla.train.adapt.adapt` (the submodule has the function's name).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "train": "xvla.train.trainer",
    "TrainConfig": "xvla.train.config",
    "AdaptConfig": "xvla.train.config",
    "load_config": "xvla.configio",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'xvla.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
