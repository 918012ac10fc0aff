"""torch.compile settings shared by the compiled sampler and the regionally compiled training layers."""

from __future__ import annotations

import torch


def raise_recompile_limit(limit: int = 64) -> None:
    """Static-shape compilation keeps one entry per (shape, batch size, train/eval) per code object: more than
    dynamo's default of 8 (DaViT alone has 4 stage shapes), past which it silently falls back to eager."""
    dyn = torch._dynamo.config
    name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
    setattr(dyn, name, max(getattr(dyn, name), limit))
