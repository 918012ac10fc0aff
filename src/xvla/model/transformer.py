"""Soft-prompted transformer head: per-domain input/output layers, soft-prompt hub, pre-LN blocks.

Parameter names follow the authors' checkpoints (`blocks.{i}.attn.qkv`, `action_encoder.fc`, `soft_prompt_hub`, ...)
so their weights load without renaming.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN

from xvla.config import HeadConfig

_F = TypeVar("_F", bound=Callable[..., Any])


def fp32_under_cpu_autocast(attention: _F) -> _F:
    """`attention` run in fp32 while CPU bf16 autocast is on (unchanged otherwise).

    torch 2.13's CPU flash-attention backward is ~5x slower in bf16 than in fp32 at this project's head sizes,
    which cancels the bf16 matmul gain of CPU training (docs/performance.md); the attention is a small share of
    the FLOPs, so it keeps fp32 and the linear layers around it run in bf16."""

    @functools.wraps(attention)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_autocast_enabled("cpu"):
            return attention(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return attention(
                *(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args), **kwargs
            )

    return wrapped  # type: ignore[return-value]


scaled_dot_product_attention = fp32_under_cpu_autocast(F.scaled_dot_product_attention)


def timestep_embedding(t: Tensor, freqs: Tensor) -> Tensor:
    """Sinusoidal embedding of continuous t in [0, 1]: t [B], freqs [dim/2] -> [B, dim] laid out [cos | sin]."""
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def time_frequencies(dim: int, max_period: float = 100.0) -> Tensor:
    """max_period^(-k/half) for k < half = dim/2."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)


class DomainAwareLinear(nn.Module):
    """One linear map per domain, stored as an embedding of flattened [in, out] matrices plus a per-domain bias.

    x [B, T, in] (or [B, in]), domain_id [B] -> x @ W[domain] + b[domain].

    `fp32_under_autocast`: compute in fp32 (weights cast) while autocast is on, output fp32. For the action's
    input and output layers: bf16 rounding of the noisy action on the way in and of the prediction on the way out
    raised a trained demo model's flow loss by 2.6% (docs/performance.md); they hold A x H weights, so fp32 is
    cheap there.
    """

    def __init__(
        self, in_features: int, out_features: int, num_domains: int, fp32_under_autocast: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp32_under_autocast = fp32_under_autocast
        self.fc = nn.Embedding(num_domains, in_features * out_features)
        self.bias = nn.Embedding(num_domains, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default range, per domain
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.bias.weight)

    @property
    def num_domains(self) -> int:
        return self.fc.num_embeddings

    def forward(self, x: Tensor, domain_id: Tensor) -> Tensor:
        device = x.device.type
        if (
            self.fp32_under_autocast
            and torch.amp.is_autocast_available(device)
            and torch.is_autocast_enabled(device)
        ):
            with torch.autocast(device, enabled=False):
                return self._linear(x.float(), domain_id, torch.float32)
        return self._linear(x, domain_id, None)

    def _linear(self, x: Tensor, domain_id: Tensor, dtype: torch.dtype | None) -> Tensor:
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        b = domain_id.shape[0]
        weight = self.fc(domain_id).view(b, self.in_features, self.out_features)
        bias = self.bias(domain_id).view(b, 1, self.out_features)
        if dtype is not None:
            weight, bias = weight.to(dtype), bias.to(dtype)
        y = torch.matmul(x, weight) + bias
        return y.squeeze(1) if squeeze else y

    def grow(self, n_new: int, init_from: int | None) -> None:
        """Append `n_new` domains (copies of `init_from`, or freshly initialised), keeping existing rows."""
        fresh = DomainAwareLinear(self.in_features, self.out_features, n_new).to(self.fc.weight)
        if init_from is not None:
            fresh.fc.weight.data.copy_(self.fc.weight.data[init_from].expand(n_new, -1))
            fresh.bias.weight.data.copy_(self.bias.weight.data[init_from].expand(n_new, -1))
        self.fc = _cat_embedding(self.fc, fresh.fc.weight.data)
        self.bias = _cat_embedding(self.bias, fresh.bias.weight.data)


def _cat_embedding(emb: nn.Embedding, rows: Tensor) -> nn.Embedding:
    """A new embedding with `rows` appended (old rows copied exactly)."""
    new = nn.Embedding(
        emb.num_embeddings + rows.shape[0], emb.embedding_dim, device=rows.device, dtype=rows.dtype
    )
    new.weight.data.copy_(torch.cat([emb.weight.data, rows], dim=0))
    new.weight.requires_grad_(emb.weight.requires_grad)
    return new


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, through SDPA."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [B, N, C], mask [B, 1, 1, N] bool (True = attend) or None."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.attn_dropout if self.training else 0.0
        x = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, activation: str) -> None:
        super().__init__()
        if activation not in ACT2FN:
            raise ValueError(
                f"HeadConfig.activation: expected a transformers ACT2FN name, got {activation!r}"
            )
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACT2FN[activation]
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN block: x + Attn(LN x); x + MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout, activation)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


@dataclass
class HeadContext:
    """Per-observation part of the head sequence: projected features + their position embedding, then the soft
    prompts (tokens [B, Nc, H]); the key mask over the full sequence ([B, 1, 1, T+Nc] bool or None)."""

    tokens: Tensor
    mask: Tensor | None
    domain_id: Tensor


class SoftPromptedTransformer(nn.Module):
    """Head: [action tokens | vlm tokens | aux tokens] + pos-emb, then soft prompts appended, pre-LN blocks.

    Inputs to `forward`: domain_id [B], vlm_features [B, Nvl, D], aux_features [B, Na, D], x_t [B, T, A],
    proprio [B, P], t [B]; optional key masks vlm_mask [B, Nvl], aux_mask [B, Na] (bool, True = keep).
    Output: [B, T, A].
    """

    time_freqs: Tensor  # a non-persistent buffer, registered in __init__

    def __init__(self, cfg: HeadConfig, vlm_dim: int, action_dim: int, proprio_dim: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.action_dim = action_dim
        self.blocks = nn.ModuleList(
            Block(h, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, cfg.activation) for _ in range(cfg.depth)
        )
        if cfg.use_hetero_proj:
            self.vlm_proj: nn.Module = DomainAwareLinear(vlm_dim, h, cfg.num_domains)
            self.aux_visual_proj: nn.Module = DomainAwareLinear(vlm_dim, h, cfg.num_domains)
        else:
            self.vlm_proj = nn.Linear(vlm_dim, h)
            self.aux_visual_proj = nn.Linear(vlm_dim, h)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.max_len_seq, h))
        self.norm = nn.LayerNorm(h)
        self.action_encoder = DomainAwareLinear(
            action_dim + proprio_dim + cfg.dim_time, h, cfg.num_domains, fp32_under_autocast=True
        )
        self.action_decoder = DomainAwareLinear(h, action_dim, cfg.num_domains, fp32_under_autocast=True)
        self.soft_prompt_hub = (
            nn.Embedding(cfg.num_domains, cfg.len_soft_prompts * h) if cfg.len_soft_prompts > 0 else None
        )
        self.register_buffer("time_freqs", time_frequencies(cfg.dim_time), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        if self.soft_prompt_hub is not None:
            nn.init.normal_(self.soft_prompt_hub.weight, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def num_domains(self) -> int:
        return self.action_encoder.num_domains

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SoftPromptedTransformer:
        # Keep the time frequencies in float32 through dtype casts (`model.to(torch.bfloat16)`), as released.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # untyped_calls_exclude misses super()
        self.time_freqs = time_frequencies(self.cfg.dim_time).to(self.time_freqs.device)
        return self

    def _project(self, proj: nn.Module, x: Tensor, domain_id: Tensor) -> Tensor:
        return proj(x, domain_id) if isinstance(proj, DomainAwareLinear) else proj(x)

    def context(
        self,
        domain_id: Tensor,
        vlm_features: Tensor,
        aux_features: Tensor,
        n_act: int,
        vlm_mask: Tensor | None = None,
        aux_mask: Tensor | None = None,
    ) -> HeadContext:
        """Everything that does not depend on x_t or t, computed once per observation (not once per step)."""
        b = domain_id.shape[0]
        ctx = torch.cat(
            [
                self._project(self.vlm_proj, vlm_features, domain_id),
                self._project(self.aux_visual_proj, aux_features, domain_id),
            ],
            dim=1,
        )
        ctx = ctx + self.pos_emb[:, n_act : n_act + ctx.shape[1]]
        if self.soft_prompt_hub is not None:
            prompts = self.soft_prompt_hub(domain_id).view(b, self.cfg.len_soft_prompts, self.cfg.hidden_size)
            ctx = torch.cat([ctx, prompts], dim=1)  # prompts carry no position embedding
        mask = self._key_mask(
            b, n_act + ctx.shape[1], n_act, vlm_features.shape[1], vlm_mask, aux_mask, ctx.device
        )
        return HeadContext(tokens=ctx, mask=mask, domain_id=domain_id)

    def run(self, ctx: HeadContext, x_t: Tensor, proprio: Tensor, t: Tensor) -> Tensor:
        """The per-step part: action tokens from (x_t [B,T,A], proprio [B,P], t [B]) attend to the context."""
        n_act = x_t.shape[1]
        dtype = self.pos_emb.dtype  # inputs follow the weights (a bf16 model may get fp32 proprio)
        time_emb = timestep_embedding(t, self.time_freqs).to(dtype)
        tokens = torch.cat(
            [
                x_t.to(dtype),
                proprio.to(dtype).unsqueeze(1).expand(-1, n_act, -1),
                time_emb.unsqueeze(1).expand(-1, n_act, -1),
            ],
            dim=-1,
        )
        act = self.action_encoder(tokens, ctx.domain_id) + self.pos_emb[:, :n_act]
        x = torch.cat([act, ctx.tokens], dim=1)
        for block in self.blocks:
            x = block(x, ctx.mask)
        return self.action_decoder(self.norm(x[:, :n_act]), ctx.domain_id)

    def forward(
        self,
        domain_id: Tensor,
        vlm_features: Tensor,
        aux_features: Tensor,
        x_t: Tensor,
        proprio: Tensor,
        t: Tensor,
        vlm_mask: Tensor | None = None,
        aux_mask: Tensor | None = None,
    ) -> Tensor:
        ctx = self.context(domain_id, vlm_features, aux_features, x_t.shape[1], vlm_mask, aux_mask)
        return self.run(ctx, x_t, proprio, t)

    def _key_mask(
        self,
        b: int,
        n: int,
        n_act: int,
        n_vlm: int,
        vlm_mask: Tensor | None,
        aux_mask: Tensor | None,
        device: torch.device,
    ) -> Tensor | None:
        """[B, 1, 1, N] bool key mask, or None when no masking is requested (the released behaviour)."""
        if vlm_mask is None and aux_mask is None:
            return None
        keep = torch.ones(b, n, dtype=torch.bool, device=device)
        if vlm_mask is not None:
            keep[:, n_act : n_act + n_vlm] = vlm_mask
        if aux_mask is not None:
            keep[:, n_act + n_vlm : n_act + n_vlm + aux_mask.shape[1]] = aux_mask
        return keep[:, None, None, :]

    def grow_domains(self, n_new: int, init_from: int | None) -> None:
        """Append `n_new` domains to every per-domain table; existing rows are copied unchanged."""
        for layer in (self.action_encoder, self.action_decoder, self.vlm_proj, self.aux_visual_proj):
            if isinstance(layer, DomainAwareLinear):
                layer.grow(n_new, init_from)
        if self.soft_prompt_hub is not None:
            hub = self.soft_prompt_hub
            rows = torch.empty(n_new, hub.embedding_dim, device=hub.weight.device, dtype=hub.weight.dtype)
            if init_from is not None:
                rows.copy_(hub.weight.data[init_from].expand(n_new, -1))
            else:
                nn.init.normal_(rows, std=0.02)
            self.soft_prompt_hub = _cat_embedding(hub, rows)
