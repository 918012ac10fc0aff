"""FLOPs and weight bytes of an XVLA config, counted with `torch.utils.flop_counter.FlopCounterMode` on the meta
device (no weights, no compute). Tables for the 0.9B preset: docs/performance.md."""

from __future__ import annotations

import dataclasses

import torch

from xvla.config import XVLAConfig
from xvla.model.fast.sampling import static_encode
from xvla.model.xvla import XVLA


def count_flops(model_config: XVLAConfig, batch_size: int = 1, views: int | None = None) -> dict[str, int]:
    """FLOPs of one forward of each part, counted on the meta device (no memory, no compute):
    {"vision": all views, "text": BART encoder, "head": one head pass, "chunk": vision + text + head x num_steps,
    "train_sample": 3 x (vision + text + head) / batch_size}, for `batch_size` samples of `views` views."""
    from torch.utils.flop_counter import FlopCounterMode

    # A text-padding mask changes which tokens attend, not the FLOPs; and transformers' BART reads a mask's values
    # (`.all()`), which meta tensors do not have: count the same model without it.
    cfg = dataclasses.replace(model_config, mask_text_padding=False)
    v = views or cfg.num_views
    with torch.device("meta"):
        model = XVLA(cfg).eval()
        b = batch_size
        pixels = torch.zeros(b * v, 3, cfg.image_size, cfg.image_size)
        ids = torch.zeros(b, cfg.max_text_len, dtype=torch.long)
        counts: dict[str, int] = {}
        with FlopCounterMode(display=False) as fc:
            feats = model.vlm.encode_images(pixels)
        counts["vision"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            enc = static_encode(
                model,
                pixels.view(b, v, *pixels.shape[1:]),
                torch.ones(b, v, dtype=torch.bool),
                ids,
                None,
                torch.float32,
            )
        counts["text"] = fc.get_total_flops() - counts["vision"]
        del feats
        x = torch.zeros(b, cfg.num_actions, model.action_space.dim)
        with FlopCounterMode(display=False) as fc:
            model.denoise(
                x, torch.zeros(b), torch.zeros(b, cfg.proprio_dim), torch.zeros(b, dtype=torch.long), enc
            )
        counts["head"] = fc.get_total_flops()
    counts["chunk"] = counts["vision"] + counts["text"] + counts["head"] * cfg.num_steps
    counts["train_sample"] = 3 * (counts["vision"] + counts["text"] + counts["head"]) // b
    return counts


def weight_bytes(model_config: XVLAConfig, bytes_per_param: int = 2) -> dict[str, int]:
    """Weight bytes read per chunk at batch 1: encoder once, head once per step (the memory-bandwidth floor)."""
    with torch.device("meta"):
        model = XVLA(model_config)
    enc = sum(p.numel() for p in model.vlm.parameters())
    head = sum(p.numel() for p in model.transformer.parameters())
    # Per-domain tables are read one row per sample, not whole.
    tr = model.transformer
    tables = [tr.action_encoder, tr.action_decoder] + (
        [tr.soft_prompt_hub] if tr.soft_prompt_hub is not None else []
    )
    per_domain = sum(p.numel() for t in tables for p in t.parameters())
    head_read = head - per_domain + per_domain // tr.num_domains
    return {
        "encoder_params": enc,
        "head_params": head,
        "chunk_bytes": (enc + head_read * model_config.num_steps) * bytes_per_param,
    }
