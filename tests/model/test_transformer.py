"""The soft-prompted head on its own (xvla.model.transformer): time embedding, per-domain layers, shapes, masks."""

from __future__ import annotations

import math

import pytest
import torch

from xvla.config import HeadConfig
from xvla.model.transformer import (
    Attention,
    DomainAwareLinear,
    SoftPromptedTransformer,
    fp32_under_cpu_autocast,
    time_frequencies,
    timestep_embedding,
)

B, T, A, P, D = 2, 5, 6, 4, 8  # batch, action tokens, action width, proprio width, feature width
N_VLM, N_AUX, PROMPTS = 7, 3, 2


def test_time_embedding_known_values() -> None:
    freqs = time_frequencies(4)  # 100^(-k/2) for k = 0, 1
    torch.testing.assert_close(freqs, torch.tensor([1.0, 0.1]))
    assert time_frequencies(32)[-1].item() == pytest.approx(100 ** (-15 / 16), rel=1e-6)
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 0.5]), freqs)
    expected = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],
            [math.cos(1.0), math.cos(0.1), math.sin(1.0), math.sin(0.1)],  # [cos | sin]
            [math.cos(0.5), math.cos(0.05), math.sin(0.5), math.sin(0.05)],
        ]
    )
    torch.testing.assert_close(emb, expected)


def test_domain_aware_linear_picks_each_samples_domain() -> None:
    layer = DomainAwareLinear(3, 2, num_domains=3)
    weights = torch.arange(3 * 6, dtype=torch.float32).view(3, 3, 2)  # W[d] is [in, out]
    biases = torch.tensor([[0.0, 0.0], [10.0, 20.0], [-1.0, 1.0]])
    with torch.no_grad():
        layer.fc.weight.copy_(weights.flatten(1))
        layer.bias.weight.copy_(biases)
    x = torch.randn(4, 5, 3)
    domain = torch.tensor([2, 0, 1, 2])
    y = layer(x, domain)
    assert y.shape == (4, 5, 2)
    for i, d in enumerate(domain.tolist()):
        torch.testing.assert_close(y[i], x[i] @ weights[d] + biases[d])
    flat = layer(x[:, 0], domain)  # [B, in] -> [B, out]
    assert flat.shape == (4, 2)
    torch.testing.assert_close(flat, y[:, 0])


def _head(len_soft_prompts: int = PROMPTS) -> SoftPromptedTransformer:
    torch.manual_seed(0)
    cfg = HeadConfig(
        hidden_size=16, depth=2, num_heads=2, num_domains=3, len_soft_prompts=len_soft_prompts, max_len_seq=32
    )
    return SoftPromptedTransformer(cfg, vlm_dim=D, action_dim=A, proprio_dim=P).eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "domain_id": torch.tensor([0, 2]),
        "vlm_features": torch.randn(B, N_VLM, D, generator=g),
        "aux_features": torch.randn(B, N_AUX, D, generator=g),
        "x_t": torch.randn(B, T, A, generator=g),
        "proprio": torch.randn(B, P, generator=g),
        "t": torch.tensor([0.1, 0.9]),
    }


@pytest.mark.parametrize("prompts", [PROMPTS, 0])
def test_head_shapes(prompts: int) -> None:
    head, x = _head(prompts), _inputs()
    assert head(**x).shape == (B, T, A)
    ctx = head.context(x["domain_id"], x["vlm_features"], x["aux_features"], T)
    assert ctx.tokens.shape == (B, N_VLM + N_AUX + prompts, 16)  # prompts appended after the features
    assert ctx.mask is None  # no masks given: the released behaviour


def test_key_mask_layout() -> None:
    head, x = _head(), _inputs()
    vlm_mask = torch.tensor([[True] * N_VLM, [True] * 4 + [False] * 3])
    aux_mask = torch.tensor([[False] * N_AUX, [True] * N_AUX])
    ctx = head.context(x["domain_id"], x["vlm_features"], x["aux_features"], T, vlm_mask, aux_mask)
    assert ctx.mask is not None and ctx.mask.shape == (B, 1, 1, T + N_VLM + N_AUX + PROMPTS)
    keep = ctx.mask[:, 0, 0]
    assert bool(keep[:, :T].all()) and bool(keep[:, -PROMPTS:].all())  # actions and prompts always attended
    assert torch.equal(keep[:, T : T + N_VLM], vlm_mask)
    assert torch.equal(keep[:, T + N_VLM : T + N_VLM + N_AUX], aux_mask)


def test_masked_features_do_not_reach_the_actions() -> None:
    head, x = _head(), _inputs()
    vlm_mask = torch.ones(B, N_VLM, dtype=torch.bool)
    vlm_mask[:, -2:] = False
    changed = dict(x, vlm_features=x["vlm_features"].clone())
    changed["vlm_features"][:, -2:] += 5.0
    with torch.no_grad():
        assert torch.equal(head(**x, vlm_mask=vlm_mask), head(**changed, vlm_mask=vlm_mask))
        assert not torch.allclose(head(**x), head(**changed))  # unmasked, the same change does reach them


def test_domain_selects_prompts_and_heads() -> None:
    head, x = _head(), _inputs()
    with torch.no_grad():
        same = head(**dict(x, domain_id=torch.tensor([1, 1])))
        other = head(**dict(x, domain_id=torch.tensor([1, 2])))
    assert torch.equal(same[0], other[0]) and not torch.allclose(same[1], other[1])


def test_attention_key_mask() -> None:
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, dropout=0.0).eval()
    x = torch.randn(1, 4, 8)
    mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    changed = x.clone()
    changed[:, 3] += 1.0
    with torch.no_grad():
        out, out_changed = attn(x, mask), attn(changed, mask)
    assert out.shape == (1, 4, 8)
    torch.testing.assert_close(out[:, :3], out_changed[:, :3])  # the masked key is never attended to
    with torch.no_grad():
        assert not torch.allclose(attn(x)[:, :3], attn(changed)[:, :3])  # unmasked it is


def test_attention_runs_in_fp32_under_cpu_bf16_autocast() -> None:
    seen: list[torch.dtype] = []

    def probe(q: torch.Tensor, k: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        seen.append(q.dtype)
        return (q @ k.transpose(-1, -2)) * scale

    wrapped = fp32_under_cpu_autocast(probe)
    q = torch.randn(2, 3, 4, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(q, k, scale=0.5)
        plain = probe(q, k)  # the unwrapped matmul autocasts to bf16
    assert seen == [torch.float32, torch.bfloat16]
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    out.sum().backward()  # the cast is differentiable: the bf16 input gets its gradient
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    seen.clear()
    assert wrapped(q.float(), k).dtype == torch.float32 and seen == [torch.float32]  # no autocast: unchanged


def test_action_layers_run_in_fp32_under_bf16_autocast() -> None:
    """The head's action encoder and decoder compute in fp32 under autocast (bf16 rounding of the noisy action
    and of the prediction raised a trained model's flow loss by 2.6%); other domain-aware layers autocast."""
    torch.manual_seed(0)
    head = SoftPromptedTransformer(HeadConfig(hidden_size=D, depth=1, num_heads=2, num_domains=3), D, A, P)
    assert head.action_encoder.fp32_under_autocast and head.action_decoder.fp32_under_autocast
    x = torch.randn(B, T, D)
    domain_id = torch.tensor([0, 2])
    exact = head.action_decoder(x, domain_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = head.action_decoder(x, domain_id)
        plain = DomainAwareLinear(D, A, 3)
        plain.load_state_dict(head.action_decoder.state_dict())
        rounded = plain(x, domain_id)
    assert kept.dtype == torch.float32
    torch.testing.assert_close(kept, exact)  # the same computation as without autocast
    # without the flag the matmul runs in bf16 (the fp32 bias promotes the sum): what the flag avoids
    assert not torch.allclose(rounded.float(), exact, atol=1e-4)
    bf16_model = DomainAwareLinear(D, A, 3, fp32_under_autocast=True).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 16-bit weights (the fast sampler) are cast up
        assert bf16_model(x.bfloat16(), domain_id).dtype == torch.float32
    assert bf16_model(x.bfloat16(), domain_id).dtype == torch.bfloat16  # no autocast: unchanged
