"""Helpers for model tests: a small 64 px config, a matching random batch, and the `build_small_model`."""

from __future__ import annotations

import torch

from xvla.config import HeadConfig, TextConfig, VisionConfig, XVLAConfig
from xvla.model import XVLA

torch.set_num_threads(1)


def small_config(**changes: object) -> XVLAConfig:
    """A fast 64 px config (5 tokens per view) with a tiny vocabulary."""
    cfg = XVLAConfig(
        vision=VisionConfig(
            embed_dim=(8, 16, 16, 32),
            num_heads=(1, 2, 2, 4),
            num_groups=(1, 2, 2, 4),
            depths=(1, 1, 1, 1),
            window_size=4,
        ),
        text=TextConfig(
            vocab_size=300,
            d_model=32,
            encoder_layers=1,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            max_position_embeddings=64,
        ),
        head=HeadConfig(
            hidden_size=32, depth=2, num_heads=4, num_domains=4, len_soft_prompts=4, max_len_seq=128
        ),
        image_size=64,
        max_text_len=12,
    )
    return cfg.replace(**changes) if changes else cfg


def make_batch(
    cfg: XVLAConfig, b: int = 2, seed: int = 0, views: int | None = None
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = views or cfg.num_views
    mask = torch.ones(b, v, dtype=torch.bool)
    mask[-1, 1:] = False
    pixels = torch.randn(b, v, 3, cfg.image_size, cfg.image_size, generator=g) * mask[..., None, None, None]
    ids = torch.randint(3, cfg.text.vocab_size, (b, cfg.max_text_len), generator=g)
    att = torch.ones_like(ids)
    ids[-1, 5:], att[-1, 5:] = cfg.text.pad_token_id, 0
    from xvla.model.action_spaces import build_action_space

    space = build_action_space(cfg.action_space, cfg.real_action_dim, cfg.max_action_dim)
    action = torch.randn(b, cfg.num_actions, space.input_dim, generator=g)
    for i in space.gripper_idx:
        action[..., i] = (action[..., i] > 0).float()
    return {
        "pixel_values": pixels,
        "image_mask": mask,
        "input_ids": ids,
        "attention_mask": att,
        "domain_id": torch.arange(b) % cfg.head.num_domains,
        "proprio": torch.randn(b, cfg.proprio_dim, generator=g),
        "action": action,
    }


def build_small_model() -> XVLA:
    """A seeded small model in eval mode."""
    torch.manual_seed(0)
    return XVLA(small_config()).eval()
