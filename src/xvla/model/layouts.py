"""The authors' (2toINF/X-VLA) and LeRobot's (`lerobot.policies.xvla`) checkpoint layouts, in both directions.

This is the one definition of each foreign layout: `checkpoint.py` reads through `config_from_layout` /
`state_from_layout`, `export.py` writes through `config_to_layout` / `state_to_layout` (+ `lerobot_processors`).

Weights: both use the vendored remote-code Florence-2 names (`vlm.image_projection` as an `[in, out]` matrix used as
`x @ W`, DaViT `PreNorm`/`Mlp` wrappers, BART under `language_model.model.`); ours are transformers' native
Florence-2 names. `RENAMES` maps one to the other, key by key. LeRobot prefixes every key with `model.` and stores
the tied token embedding under the encoder alias; the authors store it as `shared.weight`.

Config: the authors' is a transformers `XVLAConfig` (head fields + nested `florence_config`); LeRobot's a flat
draccus policy config (`"type": "xvla"`, `chunk_size`, `max_state_dim`, `input_features`, ...) holding the same
`florence_config`. Both shared fixtures document the layouts (`../shared/fixtures/*/README.md`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor

from xvla.config import HeadConfig, TextConfig, VisionConfig, XVLAConfig
from xvla.model.action_spaces import build_action_space

Layout = Literal["xvla", "authors", "lerobot"]
ForeignLayout = Literal["authors", "lerobot"]
FOREIGN_LAYOUTS: tuple[ForeignLayout, ...] = ("authors", "lerobot")

LEROBOT_PREFIX = "model."  # XVLAPolicy -> .model (XVLAModel)
AUTHORS_EMBEDDING = (
    "vlm.language_model.model.shared.weight"  # the tied token embedding, as the authors store it
)
LEROBOT_EMBEDDING = "vlm.language_model.model.encoder.embed_tokens.weight"  # ... as LeRobot stores it
FINAL_LOGITS_BIAS = "vlm.language_model.final_logits_bias"  # unused LM-head buffer [1, vocab], all zero
VENDORED_PROJECTION = "vlm.image_projection"  # [in, out], used as x @ W
NATIVE_PROJECTION = "vlm.multi_modal_projector.image_projection.weight"  # bias-free Linear, [out, in]

# Placeholders of the rename templates: each matches one dotted part (or, for `rest`, the rest of the key).
_PLACEHOLDERS = {
    "s": r"\d+",
    "j": r"\d+",
    "b": r"spatial_block|channel_block",
    "attn": r"window_attn|channel_attn",
    "rest": r".+",
}
_BLOCK = "vlm.vision_tower.blocks.{s}.{j}"
# (vendored, native) key templates; in either direction the first template that matches a whole key wins, and a
# key no template matches keeps its name (the head, DaViT `convs.{s}.norm`).
RENAMES: tuple[tuple[str, str], ...] = (
    (AUTHORS_EMBEDDING, "vlm.language_model.encoder.embed_tokens.weight"),
    ("vlm.language_model.model.encoder.{rest}", "vlm.language_model.encoder.{rest}"),
    ("vlm.image_proj_norm.{rest}", "vlm.multi_modal_projector.image_proj_norm.{rest}"),
    ("vlm.image_pos_embed.{rest}", "vlm.multi_modal_projector.image_position_embed.{rest}"),
    ("vlm.visual_temporal_embed.{rest}", "vlm.multi_modal_projector.visual_temporal_embed.{rest}"),
    ("vlm.vision_tower.convs.{s}.proj.{rest}", "vlm.vision_tower.convs.{s}.conv.{rest}"),
    (_BLOCK + ".{b}.conv1.fn.dw.{rest}", _BLOCK + ".{b}.conv1.{rest}"),
    (_BLOCK + ".{b}.conv2.fn.dw.{rest}", _BLOCK + ".{b}.conv2.{rest}"),
    (_BLOCK + ".spatial_block.window_attn.norm.{rest}", _BLOCK + ".spatial_block.norm1.{rest}"),
    (_BLOCK + ".channel_block.channel_attn.norm.{rest}", _BLOCK + ".channel_block.norm1.{rest}"),
    (_BLOCK + ".{b}.{attn}.fn.{rest}", _BLOCK + ".{b}.{attn}.{rest}"),
    (_BLOCK + ".{b}.ffn.norm.{rest}", _BLOCK + ".{b}.norm2.{rest}"),
    (_BLOCK + ".{b}.ffn.fn.net.{rest}", _BLOCK + ".{b}.ffn.{rest}"),
)


@dataclass(frozen=True)
class _Template:
    text: str

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        parts = re.split(r"\{(\w+)\}", self.text)  # literal, name, literal, name, ...
        return re.compile(
            "".join(
                re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})" for i, p in enumerate(parts)
            )
        )


_RENAME_TEMPLATES = tuple((_Template(v), _Template(n)) for v, n in RENAMES)


def vendored_to_native(key: str) -> str:
    """A vendored (authors'/LeRobot's, without `model.`) parameter name -> ours."""
    for vendored, native in _RENAME_TEMPLATES:
        if m := vendored.pattern.fullmatch(key):
            return native.text.format(**m.groupdict())
    return key


def native_to_vendored(key: str) -> str:
    """Our parameter name -> the vendored one (the authors' alias `shared.weight` for the token embedding)."""
    for vendored, native in _RENAME_TEMPLATES:
        if m := native.pattern.fullmatch(key):
            return vendored.text.format(**m.groupdict())
    return key


# ------------------------------------------------------------------------------------------------------ weights
def state_from_layout(state: dict[str, Tensor], layout: ForeignLayout, where: str) -> dict[str, Tensor]:
    """A foreign state dict -> ours. `image_projection` ([in, out], x @ W) becomes the native bias-free Linear weight
    ([out, in]); the tied token embedding may be stored under either alias; `final_logits_bias` is dropped."""
    if layout == "lerobot":
        state = {_strip(k, LEROBOT_PREFIX, where): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == FINAL_LOGITS_BIAS:
            continue
        if key == VENDORED_PROJECTION:
            out[NATIVE_PROJECTION] = value.t().contiguous()
            continue
        new = vendored_to_native(key)
        if new in out:
            if not torch.equal(out[new], value):
                raise ValueError(f"{where}: tied aliases of {new!r} hold different values")
            continue
        out[new] = value
    return out


def state_to_layout(state: dict[str, Tensor], layout: ForeignLayout) -> dict[str, Tensor]:
    """Our state dict -> the foreign layout's tensors (the inverse of `state_from_layout`; adds the zero
    `final_logits_bias` both loaders expect). A name that would not read back as itself is an error naming it."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == NATIVE_PROJECTION:
            out[VENDORED_PROJECTION] = value.t().contiguous()
            continue
        new = native_to_vendored(key)
        if vendored_to_native(new) != key:
            raise ValueError(
                f"{layout} layout: parameter {key!r} would be written as {new!r}, read back as another"
            )
        out[new] = value
    embedding = out[AUTHORS_EMBEDDING]
    out[FINAL_LOGITS_BIAS] = embedding.new_zeros(1, embedding.shape[0])
    if layout == "lerobot":
        out[LEROBOT_EMBEDDING] = out.pop(AUTHORS_EMBEDDING)
        out = {LEROBOT_PREFIX + k: v for k, v in out.items()}
    return out


def weights_metadata(layout: ForeignLayout) -> dict[str, str]:
    """The safetensors metadata each writer records: transformers' `format`; `safetensors.torch.save_model`'s
    record of the tied alias it dropped (and no `format`)."""
    if layout == "authors":
        return {"format": "pt"}
    return {LEROBOT_PREFIX + AUTHORS_EMBEDDING: LEROBOT_PREFIX + LEROBOT_EMBEDDING}


def _strip(key: str, prefix: str, where: str) -> str:
    if not key.startswith(prefix):
        raise ValueError(f"{where}: key {key!r} lacks the {prefix!r} prefix of the LeRobot layout")
    return key[len(prefix) :]


# ------------------------------------------------------------------------------------------------------- config
def _pick(d: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _florence_to_ours(florence: dict[str, Any]) -> tuple[VisionConfig, TextConfig]:
    """The nested `florence_config` (remote-code or native field names, full or minimal) -> ours."""
    vc = florence.get("vision_config") or {}
    tc = florence.get("text_config") or {}
    dv, dt = VisionConfig(), TextConfig()
    vision = VisionConfig(
        embed_dim=tuple(_pick(vc, "dim_embed", "embed_dim", default=dv.embed_dim)),
        num_heads=tuple(_pick(vc, "num_heads", default=dv.num_heads)),
        num_groups=tuple(_pick(vc, "num_groups", default=dv.num_groups)),
        depths=tuple(_pick(vc, "depths", default=dv.depths)),
        window_size=_pick(vc, "window_size", default=dv.window_size),
        patch_size=tuple(_pick(vc, "patch_size", default=dv.patch_size)),
        patch_stride=tuple(_pick(vc, "patch_stride", default=dv.patch_stride)),
        patch_padding=tuple(_pick(vc, "patch_padding", default=dv.patch_padding)),
        patch_prenorm=tuple(_pick(vc, "patch_prenorm", default=dv.patch_prenorm)),
        drop_path_rate=_pick(vc, "drop_path_rate", default=dv.drop_path_rate),
        max_position_embeddings=_pick(
            vc.get("image_pos_embed") or {},
            "max_pos_embeddings",
            default=_pick(vc, "max_position_embeddings", default=50),
        ),
        max_temporal_embeddings=_pick(
            vc.get("visual_temporal_embedding") or {},
            "max_temporal_embeddings",
            default=_pick(vc, "max_temporal_embeddings", default=100),
        ),
    )
    text = TextConfig(
        vocab_size=_pick(tc, "vocab_size", default=_pick(florence, "vocab_size", default=dt.vocab_size)),
        d_model=_pick(tc, "d_model", default=dt.d_model),
        encoder_layers=_pick(tc, "encoder_layers", default=dt.encoder_layers),
        encoder_attention_heads=_pick(tc, "encoder_attention_heads", default=dt.encoder_attention_heads),
        encoder_ffn_dim=_pick(tc, "encoder_ffn_dim", default=dt.encoder_ffn_dim),
        max_position_embeddings=_pick(tc, "max_position_embeddings", default=dt.max_position_embeddings),
        dropout=_pick(tc, "dropout", default=dt.dropout),
        attention_dropout=_pick(tc, "attention_dropout", default=dt.attention_dropout),
        activation_dropout=_pick(tc, "activation_dropout", default=dt.activation_dropout),
        activation_function=_pick(tc, "activation_function", default=dt.activation_function),
        pad_token_id=_pick(tc, "pad_token_id", default=dt.pad_token_id),
        bos_token_id=_pick(tc, "bos_token_id", default=dt.bos_token_id),
        eos_token_id=_pick(tc, "eos_token_id", default=dt.eos_token_id),
    )
    if tc.get("scale_embedding"):
        raise ValueError(
            "florence_config.text_config.scale_embedding=true is not supported (X-VLA uses unscaled embeddings)"
        )
    for where, dim in (
        ("florence_config.projection_dim", florence.get("projection_dim")),
        ("vision_config.projection_dim", vc.get("projection_dim")),
    ):
        if dim is not None and dim != text.d_model:
            raise ValueError(f"{where}={dim} must equal text_config.d_model={text.d_model}")
    return vision, text


def florence_config(vision: VisionConfig, text: TextConfig) -> dict[str, Any]:
    """Ours -> the `florence_config` both layouts hold, with the remote-code field names (the inverse of
    `_florence_to_ours`; only the fields it reads, plus the model types and a one-layer decoder: both loaders
    build the decoder, then delete it)."""
    return {
        "model_type": "florence2",
        "projection_dim": text.d_model,
        "vocab_size": text.vocab_size,
        "vision_config": {
            "model_type": "davit",
            "dim_embed": list(vision.embed_dim),
            "num_heads": list(vision.num_heads),
            "num_groups": list(vision.num_groups),
            "depths": list(vision.depths),
            "window_size": vision.window_size,
            "patch_size": list(vision.patch_size),
            "patch_stride": list(vision.patch_stride),
            "patch_padding": list(vision.patch_padding),
            "patch_prenorm": list(vision.patch_prenorm),
            "drop_path_rate": vision.drop_path_rate,
            "projection_dim": text.d_model,
            "image_pos_embed": {
                "type": "learned_abs_2d",
                "max_pos_embeddings": vision.max_position_embeddings,
            },
            "visual_temporal_embedding": {
                "type": "COSINE",
                "max_temporal_embeddings": vision.max_temporal_embeddings,
            },
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
        "text_config": {
            "model_type": "florence2_language",
            "vocab_size": text.vocab_size,
            "d_model": text.d_model,
            "encoder_layers": text.encoder_layers,
            "encoder_attention_heads": text.encoder_attention_heads,
            "encoder_ffn_dim": text.encoder_ffn_dim,
            "decoder_layers": 1,
            "decoder_attention_heads": text.encoder_attention_heads,
            "decoder_ffn_dim": text.encoder_ffn_dim,
            "max_position_embeddings": text.max_position_embeddings,
            "dropout": text.dropout,
            "attention_dropout": text.attention_dropout,
            "activation_dropout": text.activation_dropout,
            "activation_function": text.activation_function,
            "scale_embedding": False,
            "pad_token_id": text.pad_token_id,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
            "decoder_start_token_id": text.eos_token_id,
        },
    }


_HEAD_FIELDS = (
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_domains",
    "len_soft_prompts",
    "dim_time",
    "max_len_seq",
    "use_hetero_proj",
)


def _head(raw: dict[str, Any]) -> HeadConfig:
    d = HeadConfig()
    return HeadConfig(**{name: raw.get(name, getattr(d, name)) for name in _HEAD_FIELDS})


def _head_fields(head: HeadConfig) -> dict[str, Any]:
    return {name: getattr(head, name) for name in _HEAD_FIELDS}


def authors_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The XVLAConfig fields the authors' config.json (XVLA head fields + nested florence_config) holds."""
    vision, text = _florence_to_ours(raw["florence_config"])
    space = raw.get("action_mode", "ee6d").lower()
    real, max_dim = raw.get("real_action_dim", 20), raw.get("max_action_dim", 20)
    return {
        "vision": vision,
        "text": text,
        "head": _head(raw),
        "action_space": space,
        "real_action_dim": real,
        "max_action_dim": max_dim,
        "proprio_dim": build_action_space(
            space, real, max_dim
        ).dim,  # the authors' proprio width = action width
        "num_actions": raw.get("num_actions", 30),
    }


def config_to_authors(config: XVLAConfig, dtype: str, transformers_version: str) -> dict[str, Any]:
    """XVLAConfig -> the authors' config.json (the keys their `save_pretrained` writes, sorted as it sorts them)."""
    raw = {
        **_head_fields(config.head),
        "action_mode": config.action_space,
        "architectures": ["XVLA"],
        "florence_config": florence_config(config.vision, config.text),
        "max_action_dim": config.max_action_dim,
        "model_type": "xvla",
        "num_actions": config.num_actions,
        "real_action_dim": config.real_action_dim,
        "soft_prompt_length": config.head.len_soft_prompts,  # read by nothing; their config carries it
        "torch_dtype": dtype,
        "transformers_version": transformers_version,
        "use_proprio": True,
    }
    return dict(sorted(raw.items()))


# LeRobot's feature keys: view k is `observation.images.image{k+1}` ("image" for k = 0), the names xvla-base expects.
LEROBOT_STATE = "observation.state"
LEROBOT_ACTION = "action"


def lerobot_image_key(view: int) -> str:
    return "observation.images.image" + (str(view + 1) if view else "")


def lerobot_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The XVLAConfig fields LeRobot's draccus policy config (`type: xvla`, `chunk_size`, `max_state_dim`, ...) holds.

    As LeRobot does: the `auto` action space's real width is the action feature's; the image size is the one images
    are resized to (`resize_imgs_with_padding`) or, with no resizing, the visual features' declared size."""
    vision, text = _florence_to_ours(raw["florence_config"])
    space = raw.get("action_mode", "ee6d").lower()
    max_dim = raw.get("max_action_dim", 20)
    features = raw.get("input_features") or {}
    views = [f for f in features.values() if (f or {}).get("type") == "VISUAL"]
    action = ((raw.get("output_features") or {}).get(LEROBOT_ACTION) or {}).get("shape")
    return {
        "vision": vision,
        "text": text,
        "head": _head(raw),
        "action_space": space,
        "real_action_dim": action[-1] if space == "auto" and action else max_dim,
        "max_action_dim": max_dim,
        "proprio_dim": raw.get("max_state_dim", 20),
        "num_actions": raw.get("chunk_size", 30),
        "num_views": raw.get("num_image_views") or max(len(views), 1),
        "image_size": _lerobot_image_size(raw.get("resize_imgs_with_padding"), views),
        "max_text_len": raw.get("tokenizer_max_length", 50),
        "num_steps": raw.get("num_denoising_steps", 10),
    }


def _lerobot_image_size(resize: list[int] | None, views: list[dict[str, Any]]) -> int:
    sizes = {tuple(resize)} if resize else {tuple((v.get("shape") or [])[-2:]) for v in views}
    if len(sizes) == 1 and len(size := next(iter(sizes))) == 2 and size[0] == size[1]:
        return int(size[0])
    return XVLAConfig().image_size  # non-square or mixed sizes: the released size (images get resized to it)


def config_to_lerobot(config: XVLAConfig, dtype: str, tokenizer_name: str) -> dict[str, Any]:
    """XVLAConfig -> LeRobot's config.json: every field of its `XVLAConfig` in the order its draccus dump writes
    them (LeRobot 0.4.4, as the shared fixture; 0.6.1 adds `pretrained_revision` and reads it as null when
    absent). Training-only fields get LeRobot's defaults."""
    space = build_action_space(config.action_space, config.real_action_dim, config.max_action_dim)
    image: dict[str, Any] = {"type": "VISUAL", "shape": [3, config.image_size, config.image_size]}
    return {
        "type": "xvla",
        "n_obs_steps": 1,
        "input_features": {
            **{lerobot_image_key(v): image for v in range(config.num_views)},
            LEROBOT_STATE: {"type": "STATE", "shape": [config.proprio_dim]},
        },
        "output_features": {LEROBOT_ACTION: {"type": "ACTION", "shape": [space.input_dim]}},
        "device": "cpu",
        "use_amp": False,
        "use_peft": False,
        "push_to_hub": True,
        "repo_id": None,
        "private": None,
        "tags": None,
        "license": None,
        "pretrained_path": None,
        "chunk_size": config.num_actions,
        "n_action_steps": config.num_actions,
        "dtype": dtype,
        "normalization_mapping": dict(LEROBOT_NORM_MAP),
        "florence_config": florence_config(config.vision, config.text),
        "tokenizer_name": tokenizer_name,
        "tokenizer_max_length": config.max_text_len,
        "tokenizer_padding_side": "right",
        "pad_language_to": "max_length",
        **_head_fields(config.head),
        "action_mode": config.action_space,
        "num_denoising_steps": config.num_steps,
        "use_proprio": True,
        "max_state_dim": config.proprio_dim,
        "max_action_dim": config.max_action_dim,
        "domain_feature_key": None,
        "resize_imgs_with_padding": None,
        "num_image_views": config.num_views,
        "empty_cameras": 0,
        "freeze_vision_encoder": False,
        "freeze_language_encoder": False,
        "train_policy_transformer": True,
        "train_soft_prompts": True,
        "optimizer_lr": 0.0001,
        "optimizer_betas": [0.9, 0.99],
        "optimizer_eps": 1e-08,
        "optimizer_weight_decay": 0.0,
        "optimizer_grad_clip_norm": 10.0,
        "optimizer_soft_prompt_lr_scale": 1.0,
        "optimizer_soft_prompt_warmup_lr_scale": None,
        "scheduler_warmup_steps": 1000,
        "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06,
    }


# X-VLA normalises nothing (absolute targets, fixed loss scales): IDENTITY everywhere, so no stats files.
LEROBOT_NORM_MAP = {"VISUAL": "IDENTITY", "STATE": "IDENTITY", "ACTION": "IDENTITY"}
LEROBOT_PREPROCESSOR = "policy_preprocessor.json"
LEROBOT_POSTPROCESSOR = "policy_postprocessor.json"


def lerobot_processors(raw: dict[str, Any], domain_id: int) -> dict[str, dict[str, Any]]:
    """The processor pipelines `make_xvla_pre_post_processors` builds for the LeRobot config `raw`, as
    `PolicyProcessorPipeline.save_pretrained` writes them: {file name: JSON}. The preprocessor sets `domain_id`
    for every sample."""
    features = {**raw["input_features"], **raw["output_features"]}
    device = {"registry_name": "device_processor", "config": {"device": raw["device"], "float_dtype": None}}
    norm = {"eps": 1e-08, "norm_map": raw["normalization_mapping"]}
    pre = [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {
            "registry_name": "tokenizer_processor",
            "config": {
                "max_length": raw["tokenizer_max_length"],
                "task_key": "task",
                "padding_side": raw["tokenizer_padding_side"],
                "padding": raw["pad_language_to"],
                "truncation": True,
                "tokenizer_name": raw["tokenizer_name"],
            },
        },
        {"registry_name": "xvla_image_to_float", "config": {"image_keys": None, "validate_range": True}},
        {"registry_name": "xvla_imagenet_normalize", "config": {"image_keys": None}},
        {"registry_name": "xvla_add_domain_id", "config": {"domain_id": domain_id}},
        device,
        {"registry_name": "normalizer_processor", "config": {**norm, "features": features}},
    ]
    post = [
        {
            "registry_name": "unnormalizer_processor",
            "config": {"eps": norm["eps"], "features": raw["output_features"], "norm_map": norm["norm_map"]},
        },
        device,
    ]
    return {
        LEROBOT_PREPROCESSOR: {"name": "policy_preprocessor", "steps": pre},
        LEROBOT_POSTPROCESSOR: {"name": "policy_postprocessor", "steps": post},
    }


def layout_fields(raw: dict[str, Any], layout: ForeignLayout) -> dict[str, Any]:
    """The XVLAConfig fields a foreign config.json holds; the others take their defaults."""
    return lerobot_fields(raw) if layout == "lerobot" else authors_fields(raw)


def config_from_layout(raw: dict[str, Any], layout: ForeignLayout) -> XVLAConfig:
    return XVLAConfig(**layout_fields(raw, layout))
