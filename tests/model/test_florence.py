"""The Florence-2 encoder on its own (xvla.model.florence): native config, feature shapes, views, key masks,
the optional keypoint token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xvla.config import VisionConfig, XVLAConfig
from xvla.model import XVLA
from xvla.model.fast.sampling import static_encode
from xvla.model.florence import (
    EncodedObservation,
    FlorenceEncoder,
    SpatialKeypoints,
    florence2_config,
    key_masks,
)

from .model_helpers import make_batch, small_config


def _encoder(**changes: object) -> tuple[FlorenceEncoder, XVLAConfig]:
    cfg = small_config(**changes)
    torch.manual_seed(0)
    return FlorenceEncoder(cfg).eval(), cfg


def _encode(enc: FlorenceEncoder, batch: dict[str, torch.Tensor]) -> EncodedObservation:
    with torch.no_grad():
        return enc(batch["pixel_values"], batch["image_mask"], batch["input_ids"], batch["attention_mask"])


def test_native_config_follows_ours() -> None:
    cfg = small_config()
    native = florence2_config(cfg)
    assert list(native.vision_config.embed_dim) == list(cfg.vision.embed_dim)
    assert native.vision_config.projection_dim == cfg.text.d_model  # image tokens share the text width
    assert native.text_config.vocab_size == cfg.text.vocab_size
    assert native.text_config.encoder_layers == cfg.text.encoder_layers
    assert not native.text_config.scale_embedding


def test_feature_shapes() -> None:
    enc, cfg = _encoder()
    n_tok, d, n_text = cfg.tokens_per_view, cfg.text.d_model, cfg.max_text_len
    assert n_tok == 5  # 64 px: 1 + 2 x 2
    assert enc.encode_images(torch.randn(4, 3, 64, 64)).shape == (4, n_tok, d)
    out = _encode(enc, make_batch(cfg, b=2))
    assert out.vlm_features.shape == (2, n_tok + n_text, d)  # primary view, then the text
    assert out.aux_features.shape == (2, (cfg.num_views - 1) * n_tok, d)
    assert out.vlm_mask is None and out.aux_mask is None  # masking options off: released behaviour


def test_missing_and_absent_views_give_zero_features() -> None:
    enc, cfg = _encoder()
    batch = make_batch(cfg, b=2)  # sample 1 lacks its auxiliary views
    out = _encode(enc, batch)
    assert bool((out.aux_features[1] == 0).all()) and bool((out.aux_features[0] != 0).any())
    one_view = dict(batch, pixel_values=batch["pixel_values"][:, :1], image_mask=batch["image_mask"][:, :1])
    assert bool((_encode(enc, one_view).aux_features == 0).all())  # views beyond those given are padded


def test_key_masks_known_case() -> None:
    image_mask = torch.tensor([[True, True, False]])
    ids, attention = torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 0]])
    n = small_config().tokens_per_view
    assert key_masks(small_config(), image_mask, ids, attention) == (None, None)
    vlm, aux = key_masks(
        small_config(mask_text_padding=True, mask_missing_views=True), image_mask, ids, attention
    )
    assert vlm.tolist() == [[True] * n + [True, True, True, False]]
    assert aux.tolist() == [[True] * n + [False] * n]
    vlm, aux = key_masks(small_config(mask_text_padding=True), image_mask, ids, attention)
    assert aux.tolist() == [[True] * 2 * n]  # only text padding masked: every view kept
    vlm, _ = key_masks(small_config(mask_missing_views=True), image_mask, ids, attention)
    assert bool(vlm.all())  # only views masked: every word kept


@pytest.mark.parametrize("masked", [False, True])
def test_text_padding_mask_hides_pad_tokens(masked: bool) -> None:
    enc, cfg = _encoder(mask_text_padding=masked)
    batch = make_batch(cfg, b=2)  # sample 1 pads its text from token 5
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 5:] = 7  # different ids under the padding
    real = cfg.tokens_per_view + 5  # primary view + the 5 real tokens
    a, b = _encode(enc, batch).vlm_features[1, :real], _encode(enc, other).vlm_features[1, :real]
    assert torch.allclose(a, b, atol=1e-6) == masked


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"mask_text_padding": True, "mask_missing_views": True},
        {"vision": dataclasses.replace(small_config().vision, keypoints=4)},
    ],
)
def test_static_encoder_matches_the_eager_one(changes: dict[str, object]) -> None:
    """The fast path's static-shape encoder (all views through DaViT, missing ones zeroed) gives the same features."""
    cfg = small_config(**changes)
    torch.manual_seed(0)
    model = XVLA(cfg).eval()
    batch = make_batch(cfg, b=2)
    args = (batch["pixel_values"], batch["image_mask"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        eager, static = model.encode(*args), static_encode(model, *args, torch.float32)
    torch.testing.assert_close(static.vlm_features, eager.vlm_features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(static.aux_features, eager.aux_features, atol=1e-5, rtol=1e-4)
    masked = bool(changes.get("mask_text_padding"))
    assert (static.vlm_mask is None) == (eager.vlm_mask is None) == (not masked)
    if masked:
        assert torch.equal(static.vlm_mask, eager.vlm_mask) and torch.equal(static.aux_mask, eager.aux_mask)


def _with_keypoints(cfg: XVLAConfig, keypoints: int = 4, stage: int = 1) -> XVLAConfig:
    return cfg.replace(vision=dataclasses.replace(cfg.vision, keypoints=keypoints, keypoint_stage=stage))


def test_keypoint_token_is_appended_and_leaves_the_other_tokens_unchanged() -> None:
    enc, cfg = _encoder()
    kp_cfg = _with_keypoints(cfg)
    assert kp_cfg.tokens_per_view == cfg.tokens_per_view + 1
    kp_enc = FlorenceEncoder(kp_cfg).eval()
    missing, unexpected = kp_enc.load_state_dict(enc.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("keypoints.") for k in missing)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        plain, with_kp = enc.encode_images(x), kp_enc.encode_images(x)
    assert with_kp.shape == (3, cfg.tokens_per_view + 1, cfg.text.d_model)
    torch.testing.assert_close(with_kp[:, :-1], plain)  # same tower, same grid tokens
    out = _encode(kp_enc, make_batch(kp_cfg, b=2))
    assert out.aux_features.shape == (2, (cfg.num_views - 1) * kp_cfg.tokens_per_view, cfg.text.d_model)


def test_spatial_keypoints_find_the_peak() -> None:
    """A keypoint map that copies one channel points at that channel's brightest cell, in [-1, 1] coordinates."""
    kp = SpatialKeypoints(channels=2, keypoints=1, dim=4)
    with torch.no_grad():
        kp.maps.weight.zero_()
        kp.maps.weight[0, 1] = 1.0
        kp.maps.bias.zero_()
        kp.log_temperature.fill_(-3.0)  # sharp softmax
    feats = torch.zeros(1, 2, 5, 9)
    feats[0, 1, 4, 2] = 1.0  # row 4 of 5 (y = +1), column 2 of 9 (x = -0.5)
    captured: list[torch.Tensor] = []
    kp.proj.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    kp(feats)
    torch.testing.assert_close(captured[0], torch.tensor([[-0.5, 1.0]]), atol=1e-3, rtol=0)


def test_keypoint_stage_is_checked() -> None:
    with pytest.raises(ValueError, match="keypoint_stage"):
        VisionConfig(keypoints=4, keypoint_stage=4)
    with pytest.raises(ValueError, match="keypoints"):
        VisionConfig(keypoints=-1)


def test_every_attention_keeps_fp32_under_cpu_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoders' attention goes through xvla's registered SDPA (`florence.ATTENTION`) like the head's, so under
    CPU bf16 autocast every SDPA call sees fp32 inputs, and the loss stays close to fp32's."""
    import torch.nn.functional as F

    dtypes: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        dtypes.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    cfg = small_config()
    model = XVLA(cfg).train()
    batch = make_batch(cfg, 2)
    t, noise = torch.tensor([0.3, 0.7]), torch.randn(2, cfg.num_actions, cfg.max_action_dim)
    reference = model(batch, t=t, noise=noise).loss
    expected_calls = len(dtypes)
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch, t=t, noise=noise).loss
    assert len(dtypes) == expected_calls > cfg.head.depth  # the encoders' calls too, not only the head's
    assert set(dtypes) == {torch.float32}
    torch.testing.assert_close(loss.float(), reference, rtol=5e-2, atol=0.0)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
