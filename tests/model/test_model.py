"""Forward / generate / save-load behaviour of the model on a small 64 px config."""

from __future__ import annotations

import torch

from xvla.model import XVLA

from .model_helpers import build_small_model, make_batch, small_config


def test_forward_and_generate_shapes() -> None:
    small_model = build_small_model()
    cfg = small_model.config
    batch = make_batch(cfg)
    out = small_model(batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert set(out.terms) == {"position_loss", "rotate6D_loss", "gripper_loss"}
    assert out.per_sample.shape == (2,)
    torch.testing.assert_close(out.per_sample.mean(), out.loss)
    actions = small_model.generate(batch, steps=3)
    assert actions.shape == (2, cfg.num_actions, 20)
    grip = actions[..., [9, 19]]
    assert bool(((grip >= 0) & (grip <= 1)).all())


def test_injected_draws_are_deterministic() -> None:
    small_model = build_small_model()
    batch = make_batch(small_model.config)
    t, noise = torch.tensor([0.3, 0.7]), torch.randn(2, 30, 20)
    a, b = small_model(batch, t=t, noise=noise), small_model(batch, t=t, noise=noise)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(small_model.generate(batch, noise=noise), small_model.generate(batch, noise=noise))


def test_save_load_roundtrip_bit_identical(tmp_path) -> None:
    small_model = build_small_model()
    batch = make_batch(small_model.config)
    noise = torch.randn(2, 30, 20)
    small_model.save_pretrained(tmp_path / "ckpt")
    loaded = XVLA.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == small_model.config
    assert torch.equal(loaded.generate(batch, noise=noise), small_model.generate(batch, noise=noise))
    t = torch.tensor([0.2, 0.9])
    assert torch.equal(loaded(batch, t=t, noise=noise).loss, small_model(batch, t=t, noise=noise).loss)


def test_config_json_roundtrip(tmp_path) -> None:
    cfg = small_config(objective="velocity", mask_text_padding=True)
    cfg.to_json(tmp_path / "c.json")
    assert type(cfg).from_json(tmp_path / "c.json") == cfg


def test_generate_precomputed_context_matches_stepwise_denoise() -> None:
    """The sampler's precomputed head context is bit-identical to calling the full network every step."""
    small_model = build_small_model()
    batch = make_batch(small_model.config)
    noise = torch.randn(2, 30, 20)
    space = small_model.action_space
    with torch.no_grad():
        enc = small_model.encode(batch["pixel_values"], batch["image_mask"], batch["input_ids"])
        a_hat = torch.zeros_like(noise)
        for i in range(4, 0, -1):
            t = torch.full((2,), i / 4)
            p_m, x_m = space.preprocess(
                batch["proprio"], t.view(-1, 1, 1) * noise + (1 - t.view(-1, 1, 1)) * a_hat
            )
            a_hat = small_model.denoise(x_m, t, p_m, batch["domain_id"], enc)
    assert torch.equal(small_model.generate(batch, steps=4, noise=noise), space.postprocess(a_hat))


def test_bfloat16_model_accepts_float32_batch() -> None:
    small_model = build_small_model()
    batch = make_batch(small_model.config)
    noise = torch.randn(2, 30, 20)
    ref = small_model.generate(batch, noise=noise)
    small_model.to(torch.bfloat16)
    assert small_model.transformer.time_freqs.dtype == torch.float32
    out = small_model.generate(batch, noise=noise.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0)
