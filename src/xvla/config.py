"""Model configuration: frozen dataclasses, JSON round trip, named presets.

`XVLAConfig` describes the whole model: the Florence-2 encoder (DaViT vision tower + BART text encoder), the
soft-prompted transformer head, the action space and the flow objective. Presets:

- `xvla-0.9b`: the released architecture (Florence-2-large encoder, head hidden 1024, depth 24, 16 heads).
- `tiny`: the sizes of the shared parity fixtures (224 px, BART vocab).
- `demo`: small enough to train on 2 CPU cores in minutes at 64 px with a locally built tokenizer (no dropout).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xvla import configio


def _tuplify(obj: Any) -> None:
    """Turn list-valued fields of a frozen dataclass into tuples (JSON gives lists, hashing wants tuples)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list):
            object.__setattr__(obj, f.name, tuple(value))


@dataclass(frozen=True)
class VisionConfig:
    """DaViT vision tower (Florence-2). Lists are per stage."""

    embed_dim: tuple[int, ...] = (256, 512, 1024, 2048)
    num_heads: tuple[int, ...] = (8, 16, 32, 64)
    num_groups: tuple[int, ...] = (8, 16, 32, 64)
    depths: tuple[int, ...] = (1, 1, 9, 1)
    window_size: int = 12
    patch_size: tuple[int, ...] = (7, 3, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2, 2)
    patch_padding: tuple[int, ...] = (3, 1, 1, 1)
    patch_prenorm: tuple[bool, ...] = (False, True, True, True)
    drop_path_rate: float = 0.1
    mlp_ratio: float = 4.0
    activation_function: str = "gelu"  # a transformers ACT2FN name
    max_position_embeddings: int = 50  # learned 2-D position table (rows and columns)
    max_temporal_embeddings: int = 100
    # Beyond the released tower (0 = off, parity): one extra token per view holding the image coordinates of
    # `keypoints` learned spatial-softmax keypoints of stage `keypoint_stage`'s finer feature map
    # (`xvla.model.florence.SpatialKeypoints`). At 64 px the last stage is a 2 x 2 grid, the first 16 x 16.
    keypoints: int = 0
    keypoint_stage: int = 0

    def __post_init__(self) -> None:
        _tuplify(self)
        n = len(self.embed_dim)
        if self.keypoints < 0:
            raise ValueError(f"VisionConfig.keypoints: expected an integer >= 0, got {self.keypoints}")
        if not 0 <= self.keypoint_stage < n:
            raise ValueError(
                f"VisionConfig.keypoint_stage: expected a stage index in [0, {n}), got {self.keypoint_stage}"
            )
        for name in (
            "num_heads",
            "num_groups",
            "depths",
            "patch_size",
            "patch_stride",
            "patch_padding",
            "patch_prenorm",
        ):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"VisionConfig.{name}: expected {n} entries (one per stage), got {getattr(self, name)}"
                )

    def feature_map_size(self, image_size: int) -> int:
        """Side of the last stage's feature map for a square image of `image_size` pixels."""
        side = image_size
        for k, s, p in zip(self.patch_size, self.patch_stride, self.patch_padding, strict=True):
            side = (side + 2 * p - k) // s + 1
        return side

    def tokens_per_view(self, image_size: int) -> int:
        """1 pooled token + the flattened last-stage grid (224 px -> 1 + 7*7 = 50) + 1 keypoint token if on."""
        return 1 + self.feature_map_size(image_size) ** 2 + (1 if self.keypoints else 0)


@dataclass(frozen=True)
class TextConfig:
    """BART-like text encoder (only the encoder is built)."""

    vocab_size: int = 51289
    d_model: int = 1024
    encoder_layers: int = 12
    encoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    activation_function: str = "gelu"
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2


@dataclass(frozen=True)
class HeadConfig:
    """Soft-prompted transformer head."""

    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    num_domains: int = 30
    len_soft_prompts: int = 32
    dim_time: int = 32
    max_len_seq: int = 512
    use_hetero_proj: bool = False  # per-domain vlm_proj / aux_visual_proj
    activation: str = "gelu_pytorch_tanh"  # the blocks' MLP, a transformers ACT2FN name (released: tanh GELU)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"HeadConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.dim_time % 2:
            raise ValueError(f"HeadConfig.dim_time must be even, got {self.dim_time}")
        if self.num_domains < 1:
            raise ValueError(f"HeadConfig.num_domains must be >= 1, got {self.num_domains}")


@dataclass(frozen=True)
class XVLAConfig:
    """The whole model. `to_dict`/`from_dict` round-trip through JSON."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    action_space: str = "ee6d"
    real_action_dim: int = 20  # only used by the "auto" action space
    max_action_dim: int = 20  # only used by the "auto" action space
    proprio_dim: int = 20
    num_actions: int = 30
    num_views: int = 3
    image_size: int = 224
    max_text_len: int = 50
    objective: str = "x0_renoise"  # a name in xvla.model.flow.OBJECTIVES, checked when the model is built
    num_steps: int = 10  # default sampler steps
    # Options beyond the released model; off by default so checkpoint parity holds.
    mask_text_padding: bool = False
    mask_missing_views: bool = False
    # The released model zeroes the proprio's gripper channels, so a policy cannot tell from its inputs whether
    # it has already closed the gripper: at a grasp every query then starts with an open-then-close chunk.
    proprio_gripper: bool = False  # feed the proprio's gripper channels to the network

    def __post_init__(self) -> None:
        if not self.num_views >= 1:
            raise ValueError(f"XVLAConfig.num_views must be >= 1, got {self.num_views}")
        if self.num_steps < 1:
            raise ValueError(f"XVLAConfig.num_steps must be >= 1, got {self.num_steps}")
        if self.vision.feature_map_size(self.image_size) < 1:
            raise ValueError(f"XVLAConfig.image_size {self.image_size} is too small for the vision tower")
        if self.seq_len > self.head.max_len_seq:
            raise ValueError(
                f"XVLAConfig: head sequence {self.seq_len} tokens (actions + views + text) exceeds "
                f"head.max_len_seq={self.head.max_len_seq}"
            )
        if self.tokens_per_view + self.max_text_len > self.text.max_position_embeddings:
            raise ValueError(
                f"XVLAConfig: {self.tokens_per_view} image + {self.max_text_len} text tokens exceed "
                f"text.max_position_embeddings={self.text.max_position_embeddings}"
            )

    @property
    def tokens_per_view(self) -> int:
        return self.vision.tokens_per_view(self.image_size)

    @property
    def seq_len(self) -> int:
        """Head tokens before the soft prompts: actions + (primary view + text) + auxiliary views."""
        return self.num_actions + self.tokens_per_view * self.num_views + self.max_text_len

    def replace(self, **changes: Any) -> XVLAConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return configio.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> XVLAConfig:
        """Strict and typed (`xvla.configio`); the `format` marker of `config.json` is skipped."""
        return configio.from_dict(cls, {k: v for k, v in data.items() if k != "format"}, path="XVLAConfig")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "xvla", **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> XVLAConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _tiny() -> XVLAConfig:
    return XVLAConfig(
        vision=VisionConfig(
            embed_dim=(16, 32, 64, 128),
            num_heads=(2, 4, 8, 16),
            num_groups=(2, 4, 8, 16),
            depths=(1, 1, 1, 1),
        ),
        text=TextConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128),
        head=HeadConfig(hidden_size=64, depth=2, num_heads=4),
    )


def _demo() -> XVLAConfig:
    # No dropout or drop-path anywhere: this model starts from random weights and trains for minutes on a few
    # dozen demonstrations, where dropout slows learning, and its random masks cost a third of a CPU step.
    # Exact GELU everywhere, the head included (released head: tanh GELU): with torch 2.13 on CPU the tanh form
    # runs 2.7x (AVX-512 kernels) to 4x (AVX2 kernels) slower forward + backward, 13% of a training step.
    # 16 text tokens hold every demo instruction that needs telling apart (each source has one task string,
    # Sawyer two of 5 and 15 tokens).
    return XVLAConfig(
        vision=VisionConfig(
            embed_dim=(16, 32, 64, 128),
            num_heads=(1, 2, 4, 8),
            num_groups=(1, 2, 4, 8),
            depths=(1, 1, 1, 1),
            window_size=4,
            drop_path_rate=0.0,
            activation_function="gelu",
        ),
        text=TextConfig(
            vocab_size=1024,
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=128,
            max_position_embeddings=128,
            dropout=0.0,
            attention_dropout=0.0,
            activation_function="gelu",
        ),
        head=HeadConfig(
            hidden_size=128,
            depth=4,
            num_heads=4,
            dropout=0.0,
            num_domains=8,
            len_soft_prompts=8,
            max_len_seq=256,
            activation="gelu",
        ),
        image_size=64,
        max_text_len=16,
    )


PRESETS: dict[str, Any] = {"xvla-0.9b": XVLAConfig, "tiny": _tiny, "demo": _demo}


def get_preset(name: str) -> XVLAConfig:
    """A named configuration (`xvla-0.9b`, `tiny`, `demo`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()
