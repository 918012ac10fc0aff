"""Florence-2 encoder on transformers' native pieces: DaViT vision tower, multi-modal projector, BART encoder.

Only the encoder side is built (the BART decoder and LM head are never used by X-VLA). Module names follow
`transformers.Florence2Model` (`vision_tower`, `multi_modal_projector`, `language_model.encoder`), so native
Florence-2 weights map 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, BartConfig, Florence2Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.bart.modeling_bart import BartEncoder
from transformers.models.florence2.modeling_florence2 import (
    Florence2MultiModalProjector,
    Florence2VisionBackbone,
)

from xvla.config import XVLAConfig
from xvla.model.transformer import fp32_under_cpu_autocast

if TYPE_CHECKING:
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig


# transformers' SDPA attention (and its masks) for the encoders, kept in fp32 under CPU bf16 autocast like the
# head's.
ATTENTION = "xvla_sdpa"
AttentionInterface.register(ATTENTION, fp32_under_cpu_autocast(sdpa_attention_forward))
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@dataclass
class EncodedObservation:
    """What the head attends to.

    vlm_features [B, Nv+L, D]: primary view + text through the BART encoder.
    aux_features [B, (V-1)*Nv, D]: auxiliary views (projected image tokens, zeros for missing views).
    vlm_mask [B, Nv+L] / aux_mask [B, (V-1)*Nv]: bool key masks (None unless the masking options are on).
    """

    vlm_features: Tensor
    aux_features: Tensor
    vlm_mask: Tensor | None = None
    aux_mask: Tensor | None = None


def florence2_config(cfg: XVLAConfig) -> Florence2Config:
    """The native transformers config for the encoder parts described by `cfg`."""
    v, t = cfg.vision, cfg.text
    vision = {
        "embed_dim": list(v.embed_dim),
        "num_heads": list(v.num_heads),
        "num_groups": list(v.num_groups),
        "depths": list(v.depths),
        "window_size": v.window_size,
        "patch_size": list(v.patch_size),
        "patch_stride": list(v.patch_stride),
        "patch_padding": list(v.patch_padding),
        "patch_prenorm": list(v.patch_prenorm),
        "drop_path_rate": v.drop_path_rate,
        "mlp_ratio": v.mlp_ratio,
        "activation_function": v.activation_function,
        "projection_dim": t.d_model,  # image tokens share the text width
        "max_position_embeddings": v.max_position_embeddings,
        "max_temporal_embeddings": v.max_temporal_embeddings,
    }
    text = BartConfig(
        vocab_size=t.vocab_size,
        d_model=t.d_model,
        encoder_layers=t.encoder_layers,
        encoder_attention_heads=t.encoder_attention_heads,
        encoder_ffn_dim=t.encoder_ffn_dim,
        decoder_layers=t.encoder_layers,
        decoder_attention_heads=t.encoder_attention_heads,
        decoder_ffn_dim=t.encoder_ffn_dim,
        max_position_embeddings=t.max_position_embeddings,
        dropout=t.dropout,
        attention_dropout=t.attention_dropout,
        activation_dropout=t.activation_dropout,
        activation_function=t.activation_function,
        encoder_layerdrop=0.0,
        scale_embedding=False,
        pad_token_id=t.pad_token_id,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
    )
    native = Florence2Config(vision_config=vision, text_config=text.to_dict())
    native._attn_implementation = ATTENTION  # the composite config's setter passes it to both sub-configs
    return native


def key_masks(
    cfg: XVLAConfig, image_mask: Tensor, input_ids: Tensor, attention_mask: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Key masks (True = attend) of the encoded observation: vlm [B, Nv+L] over the primary view's tokens and the
    text, aux [B, (V-1)*Nv] over the other views' tokens, for image_mask [B, V] (V = config.num_views) and
    input_ids / attention_mask [B, L]. (None, None) unless a masking option is on (released behaviour)."""
    if not (cfg.mask_text_padding or cfg.mask_missing_views):
        return None, None
    n_tok = cfg.tokens_per_view
    views = image_mask.bool() if cfg.mask_missing_views else torch.ones_like(image_mask, dtype=torch.bool)
    words = (
        attention_mask.bool()
        if cfg.mask_text_padding and attention_mask is not None
        else torch.ones_like(input_ids, dtype=torch.bool)
    )
    vlm_mask = torch.cat([views[:, :1].expand(-1, n_tok), words], dim=1)
    aux_mask = views[:, 1:, None].expand(-1, -1, n_tok).reshape(views.shape[0], -1)
    return vlm_mask, aux_mask


class SpatialKeypoints(nn.Module):
    """Feature map [N, C, h, w] -> one token [N, 1, D]: the expected image coordinates (x, y in [-1, 1]) of K
    learned attention maps (spatial softmax, Levine et al. 2016; robomimic's image encoders), projected to D.

    Why: at 64 px DaViT's last stage is a 2 x 2 grid, so where a 5-pixel cube lies must be carried in channels;
    a softmax over a finer stage states it as coordinates, to a fraction of a cell."""

    def __init__(self, channels: int, keypoints: int, dim: int) -> None:
        super().__init__()
        self.maps = nn.Conv2d(channels, keypoints, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.proj = nn.Linear(2 * keypoints, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: Tensor) -> Tensor:
        n, _, h, w = feats.shape
        logits = self.maps(feats).flatten(2) / self.log_temperature.exp()  # [N, K, h*w]
        attn = logits.softmax(dim=-1)
        ys, xs = torch.meshgrid(
            torch.linspace(-1.0, 1.0, h, device=feats.device, dtype=attn.dtype),
            torch.linspace(-1.0, 1.0, w, device=feats.device, dtype=attn.dtype),
            indexing="ij",
        )
        grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # [h*w, 2]
        points = attn @ grid  # [N, K, 2]
        return self.norm(self.proj(points.flatten(1)))[:, None]


class FlorenceEncoder(nn.Module):
    """Encodes views and instruction into the features the head attends to."""

    def __init__(self, cfg: XVLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        native = florence2_config(cfg)
        # Florence2Config.__init__ turns its sub-config dicts into config objects (typed as `dict | config`)
        vision_config = cast("Florence2VisionConfig", native.vision_config)
        text_config = cast(BartConfig, native.text_config)
        self.vision_tower = Florence2VisionBackbone(vision_config)
        self.multi_modal_projector = Florence2MultiModalProjector(native)
        self.language_model = nn.ModuleDict({"encoder": BartEncoder(text_config)})
        self._init_projector()
        v = cfg.vision
        self.keypoints = (
            SpatialKeypoints(v.embed_dim[v.keypoint_stage], v.keypoints, cfg.text.d_model)
            if v.keypoints
            else None
        )

    def _init_projector(self) -> None:
        """Florence-2's init (normal, std 0.02) for the projector, which is not a PreTrainedModel of its own;
        torch's defaults would give the 2-D position table unit variance."""
        proj = self.multi_modal_projector
        nn.init.normal_(proj.image_projection.weight, std=0.02)
        nn.init.normal_(proj.image_position_embed.row_embeddings.weight, std=0.02)
        nn.init.normal_(proj.image_position_embed.column_embeddings.weight, std=0.02)

    @property
    def text_encoder(self) -> BartEncoder:
        return self.language_model["encoder"]  # type: ignore[return-value]

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N, 3, H, W] -> projected, normalised image tokens [N, Nv, D] (Nv = 1 + h*w, and one
        keypoint token last when `vision.keypoints` is on)."""
        if self.keypoints is None:
            feats = self.vision_tower(pixel_values).last_hidden_state  # [N, C, h, w]
            return self.multi_modal_projector(feats)
        tower = self.vision_tower
        hidden = pixel_values.to(next(tower.parameters()).dtype)
        for stage, (conv, block) in enumerate(zip(tower.convs, tower.blocks, strict=True)):
            hidden = conv(hidden)
            for layer in cast(nn.ModuleList, block):
                hidden = layer(hidden)
            if stage == self.cfg.vision.keypoint_stage:
                keypoints = self.keypoints(hidden)  # [N, 1, D]
        return torch.cat([self.multi_modal_projector(hidden), keypoints.to(hidden.dtype)], dim=1)

    def forward(
        self,
        pixel_values: Tensor,
        image_mask: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
    ) -> EncodedObservation:
        """pixel_values [B, V, 3, H, W], image_mask [B, V] bool, input_ids [B, L], attention_mask [B, L]."""
        b = pixel_values.shape[0]
        v = self.cfg.num_views
        n_tok = self.cfg.tokens_per_view
        d = self.cfg.text.d_model
        # Only existing views go through DaViT. Missing views, and views beyond those given up to num_views, keep
        # all-zero features whose tokens stay in the sequence (released behaviour).
        valid = self.encode_images(pixel_values[image_mask])
        image_mask = F.pad(image_mask, (0, v - image_mask.shape[1]), value=False)
        feats = valid.new_zeros(b, v, n_tok, d)
        feats[image_mask] = valid

        text_embeds = self.text_encoder.embed_tokens(input_ids)
        inputs_embeds = torch.cat([feats[:, 0], text_embeds.to(feats.dtype)], dim=1)
        vlm_mask, aux_mask = key_masks(self.cfg, image_mask, input_ids, attention_mask)
        vlm = self.text_encoder(inputs_embeds=inputs_embeds, attention_mask=vlm_mask).last_hidden_state
        return EncodedObservation(
            vlm_features=vlm,
            aux_features=feats[:, 1:].reshape(b, (v - 1) * n_tok, d),
            vlm_mask=vlm_mask,
            aux_mask=aux_mask,
        )
