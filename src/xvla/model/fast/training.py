"""Training helpers: regional `torch.compile` of the repeated layers, optional activation checkpointing of the
same layers, and `fused_adamw` (fused on CPU and CUDA). Measurements: docs/performance.md."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xvla.model.fast.dynamo import raise_recompile_limit

# The repeated layers: compiled one region at a time and recomputed by activation checkpointing.
LAYER_CLASSES = ("Block", "BartEncoderLayer", "Florence2VisionBlock")


def prepare_training(
    model: nn.Module,
    *,
    compile_layers: bool = True,
    activation_checkpointing: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    """In place: checkpoint and/or `torch.compile` each repeated layer (`LAYER_CLASSES`) as its own region, so
    compile time does not grow with depth and every head/text/vision layer shares one compiled graph."""
    layers = [m for m in model.modules() if type(m).__name__ in LAYER_CLASSES]
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        def wrap(m: nn.Module) -> nn.Module:
            return checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT)

        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: type(m).__name__ in LAYER_CLASSES
        )
    if compile_layers:
        raise_recompile_limit()
        for layer in layers:
            layer.compile(mode=compile_mode, dynamic=False)
    return model


def fused_adamw(
    params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """AdamW as the recipe has it, fused into one kernel per step on CPU and CUDA (per tensor elsewhere), as the
    trainer's `xvla.train.optim.build_optimizer`."""
    params = list(params)
    fusable = all(
        p.device.type in ("cpu", "cuda")
        for p in (q for g in params for q in (g["params"] if isinstance(g, dict) else [g]))
    )
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fusable)
