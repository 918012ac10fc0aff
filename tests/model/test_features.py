"""Domains, parameter groups, options beyond the released model, action spaces, presets, tokenizer."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from xvla.cli import main
from xvla.config import XVLAConfig, get_preset
from xvla.model import XVLA, ActionSpace, available_action_spaces, build_action_space, register_action_space
from xvla.model.tokenizer import build_tokenizer, check_fits, load_tokenizer

from .model_helpers import build_small_model, make_batch, small_config


def test_info_xvla_09b_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", "xvla-0.9b"]) == 0  # meta device: 880M parameters never allocated
    out = capsys.readouterr().out
    total = int(re.search(r"total\s+([\d,]+)", out).group(1).replace(",", ""))
    assert abs(total - 880e6) / 880e6 < 0.01
    vision = int(re.search(r"vision.*?\s([\d,]{9,})", out).group(1).replace(",", ""))
    assert abs(vision - 363e6) / 363e6 < 0.01


@pytest.mark.parametrize("hetero", [False, True])
def test_grow_domains_keeps_existing_domains_bit_identical(hetero: bool) -> None:
    torch.manual_seed(0)
    cfg = small_config()
    cfg = cfg.replace(head=type(cfg.head)(**{**cfg.head.__dict__, "use_hetero_proj": hetero}))
    model = XVLA(cfg).eval()
    batch = make_batch(cfg, b=4)
    noise = torch.randn(4, 30, 20)
    before = model.generate(batch, noise=noise)
    new_ids = model.grow_domains(2, init_from=1)
    assert new_ids == [4, 5] and model.config.head.num_domains == 6
    assert torch.equal(model.generate(batch, noise=noise), before)
    copied = dict(batch, domain_id=torch.tensor([4, 5, 4, 5]))
    source = dict(batch, domain_id=torch.tensor([1, 1, 1, 1]))
    assert torch.equal(model.generate(copied, noise=noise), model.generate(source, noise=noise))
    model.grow_domains(1)  # fresh init
    assert model.transformer.soft_prompt_hub.num_embeddings == 7
    assert torch.equal(model.generate(batch, noise=noise), before)


def test_parameter_groups_partition_all_parameters() -> None:
    small_model = build_small_model()
    groups = small_model.parameter_groups()
    assert set(groups) == {"vlm", "transformer", "soft_prompts", "action_heads"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(small_model.parameters()))
    assert groups["soft_prompts"][0] is small_model.transformer.soft_prompt_hub.weight


def test_velocity_objective_overfits_one_batch() -> None:
    torch.manual_seed(0)
    cfg = small_config(objective="velocity")
    model = XVLA(cfg).train()
    batch = make_batch(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    noise = torch.randn(2, 30, 20)
    losses = []
    for step in range(60):
        out = model(batch, t=torch.tensor([0.25, 0.75]) + 0.01 * (step % 3), noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert set(out.terms) == {"velocity_loss"}
    assert losses[-1] < 0.3 * losses[0]
    actions = model.eval().generate(batch, steps=4, noise=noise)
    assert actions.shape == (2, 30, 20) and torch.isfinite(actions).all()


def test_text_padding_mask_option() -> None:
    torch.manual_seed(0)
    masked = XVLA(small_config(mask_text_padding=True, mask_missing_views=True)).eval()
    plain = XVLA(small_config()).eval()
    plain.load_state_dict(masked.state_dict())
    batch = make_batch(masked.config)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][-1, 5:] = 7  # change only the padded positions of the last sample
    noise = torch.randn(2, 30, 20)
    assert torch.equal(masked.generate(batch, noise=noise)[-1], masked.generate(other, noise=noise)[-1])
    assert not torch.equal(plain.generate(batch, noise=noise)[-1], plain.generate(other, noise=noise)[-1])
    assert not torch.equal(masked.generate(batch, noise=noise), plain.generate(batch, noise=noise))


def test_default_is_release_behaviour() -> None:
    small_model = build_small_model()
    enc = small_model._encode_batch(make_batch(small_model.config))
    assert enc.vlm_mask is None and enc.aux_mask is None
    assert enc.aux_features.shape == (2, 2 * 5, 32)  # 64 px -> 1 + 2x2 tokens per view
    assert torch.count_nonzero(enc.aux_features[-1]) == 0  # missing views: zero features, tokens kept


def test_action_spaces() -> None:
    assert {"ee6d", "joint", "agibot_ee6d", "auto"} <= set(available_action_spaces())
    pred, target = torch.randn(2, 30, 20), torch.rand(2, 30, 20).round()
    ee = build_action_space("ee6d").loss_terms(pred, target)
    assert set(ee) == {"position_loss", "rotate6D_loss", "gripper_loss"}
    expected_pos = 500 * (
        (pred[..., :3] - target[..., :3]).square().mean()
        + (pred[..., 10:13] - target[..., 10:13]).square().mean()
    )
    torch.testing.assert_close(ee["position_loss"].mean(), expected_pos)
    agi = build_action_space("agibot_ee6d")
    assert (agi.layout, build_action_space("ee6d").layout, build_action_space("joint").layout) == (
        "ee6d",
        "ee6d",
        "joint",
    )
    p, x = agi.preprocess(torch.ones(2, 20), torch.ones(2, 30, 20))
    assert p.sum() == 40 and torch.equal(agi.postprocess(pred), pred)
    joint = build_action_space("joint")
    assert set(joint.loss_terms(pred[..., :14], target[..., :14])) == {"joints_loss", "gripper_loss"}
    auto = build_action_space("auto", real_dim=7, max_dim=20)
    assert auto.pad(torch.ones(2, 30, 7)).shape == (2, 30, 20) and auto.postprocess(pred).shape == (2, 30, 7)
    ee6 = build_action_space("ee6d")
    pm, xm = ee6.preprocess(torch.ones(2, 20), torch.ones(2, 30, 20))
    assert pm[:, [9, 19]].abs().sum() == 0 and xm[..., [9, 19]].abs().sum() == 0 and xm.sum() == 2 * 30 * 18


@pytest.mark.parametrize("proprio_gripper", [False, True])
def test_proprio_gripper_reaches_the_network_only_when_asked(proprio_gripper: bool) -> None:
    """Released: the proprio's gripper channels are zeroed (changing them changes nothing); with
    `proprio_gripper` the network reads them. The other proprio channels always count."""
    from .model_helpers import make_batch, small_config

    cfg = small_config(proprio_gripper=proprio_gripper)
    torch.manual_seed(0)
    model = XVLA(cfg).eval()
    batch = make_batch(cfg, b=2)
    batch.pop("action")
    noise = torch.randn(2, cfg.num_actions, model.action_space.dim)

    def actions_with(channel: int) -> torch.Tensor:
        changed = {**batch, "proprio": batch["proprio"].clone()}
        changed["proprio"][:, channel] += 1.0
        return model.generate(changed, steps=2, noise=noise)

    base = model.generate(batch, steps=2, noise=noise)
    assert not torch.allclose(actions_with(0), base)  # a position channel
    assert torch.allclose(actions_with(9), base) != proprio_gripper  # the left gripper channel


def test_register_new_action_space() -> None:
    @register_action_space("test_single_arm7")
    class SingleArm(ActionSpace):
        dim = 7

        def loss_terms(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"mse": (pred - target).square().flatten(1).mean(1)}

    torch.manual_seed(0)
    cfg = small_config(action_space="test_single_arm7", proprio_dim=7)
    model = XVLA(cfg).eval()
    batch = make_batch(cfg)
    assert set(model(batch).terms) == {"mse"}
    assert model.generate(batch, steps=2).shape == (2, 30, 7)


def test_joint_model_runs() -> None:
    cfg = small_config(action_space="joint", proprio_dim=14)
    model = XVLA(cfg).eval()
    batch = make_batch(cfg)
    assert model(batch).per_sample.shape == (2,)
    assert model.generate(batch, steps=2).shape == (2, 30, 14)


def test_presets_build() -> None:
    demo = get_preset("demo")
    assert demo.image_size == 64 and demo.tokens_per_view == 5
    assert get_preset("tiny").tokens_per_view == 50
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")


def test_activations_follow_the_config() -> None:
    """The demo preset's exact GELU reaches every vision, text and head MLP; the released defaults stay exact GELU
    in the encoders and tanh GELU in the head (a config without the fields, as in older checkpoints, builds the
    authors' model)."""
    from transformers.activations import ACT2FN

    exact, tanh = type(ACT2FN["gelu"]), type(ACT2FN["gelu_pytorch_tanh"])

    def acts(cfg: XVLAConfig) -> tuple[set[type], set[type]]:
        model = XVLA(cfg)
        return tuple(  # type: ignore[return-value]
            {type(m) for m in part.modules() if isinstance(m, exact | tanh)}
            for part in (model.vlm, model.transformer)
        )

    assert acts(get_preset("demo")) == ({exact}, {exact})
    old = get_preset("tiny").to_dict()
    del old["vision"]["activation_function"], old["head"]["activation"]
    assert acts(XVLAConfig.from_dict(old)) == ({exact}, {tanh})
    with pytest.raises(ValueError, match="HeadConfig.activation"):
        XVLA(
            get_preset("tiny").replace(
                head=dataclasses.replace(get_preset("tiny").head, activation="gelu_fast!")
            )
        )


def test_tokenizer_build_and_load(tmp_path) -> None:
    tok = build_tokenizer(tmp_path, vocab_size=300)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    check_fits(tok, small_config().text.vocab_size)
    ids = load_tokenizer(tmp_path)(
        "put the cube in the bowl", padding="max_length", max_length=40, truncation=True
    )["input_ids"]
    assert ids[0] == 0 and 2 in ids and ids[-1] == 1 and max(ids) < 300
    with pytest.raises(ValueError, match="vocab_size"):
        check_fits(tok, 100)


def test_save_keeps_other_files_and_overwrites(tmp_path) -> None:
    small_model = build_small_model()
    ckpt = tmp_path / "ckpt"
    small_model.save_pretrained(ckpt)
    build_tokenizer(ckpt, vocab_size=300)
    small_model.grow_domains(1)
    small_model.save_pretrained(ckpt)
    assert (ckpt / "tokenizer.json").is_file()
    assert XVLA.from_pretrained(ckpt).config.head.num_domains == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folders left behind


def test_fewer_views_are_padded_like_masked_views() -> None:
    small_model = build_small_model()
    full = make_batch(small_model.config)
    full["image_mask"][:, 1:] = False
    full["pixel_values"][:, 1:] = 0
    one = dict(full, pixel_values=full["pixel_values"][:, :1], image_mask=full["image_mask"][:, :1])
    noise = torch.randn(2, 30, 20)
    assert torch.equal(small_model.generate(one, noise=noise), small_model.generate(full, noise=noise))


def test_missing_view_mask_option() -> None:
    torch.manual_seed(0)
    masked = XVLA(small_config(mask_missing_views=True)).eval()
    plain = XVLA(small_config()).eval()
    plain.load_state_dict(masked.state_dict())
    batch = make_batch(masked.config)  # sample 0 has all views, sample 1 only the primary one
    noise = torch.randn(2, 30, 20)
    a, b = masked.generate(batch, noise=noise), plain.generate(batch, noise=noise)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)  # nothing to mask: same result
    assert (a[1] - b[1]).abs().max() > 1e-4  # missing views no longer attended to


def test_parity_replay_derives_sizes_from_files(tmp_path) -> None:
    """A fixture made the same way at another size (64 px, 12 text tokens, 3 samples, 4 steps) replays."""
    from safetensors.torch import save_file

    from xvla.model.parity import replay, run_parity

    model = build_small_model()
    batch = make_batch(model.config, b=3)
    g = torch.Generator().manual_seed(1)
    refs = {
        "in_pixel_values": batch["pixel_values"],
        "in_image_mask": batch["image_mask"].to(torch.uint8),
        "in_input_ids": batch["input_ids"],
        "in_domain_id": torch.tensor([3, 0, 2]),
        "in_proprio": batch["proprio"],
        "in_action": batch["action"],
        "in_x_t": torch.randn(3, 30, 20, generator=g),
        "in_t": torch.tensor([0.1, 0.5, 0.9]),
        "loss_u": torch.rand(1, generator=g),
        "loss_noise": torch.randn(3, 30, 20, generator=g),
        "gen_x1_noise": torch.randn(3, 30, 20, generator=g),
        "gen_step_t": torch.zeros(4, 3),
    }
    with torch.no_grad():
        outputs = replay(model, dict(refs))
    model.save_pretrained(tmp_path)
    save_file({**refs, **{k: v.contiguous() for k, v in outputs.items()}}, str(tmp_path / "refs.safetensors"))
    results, layout = run_parity(tmp_path)
    assert layout == "xvla" and {"gen_step_pred", "loss_total", "vlm_features"} <= {r.name for r in results}
    assert all(r.max_abs == 0 for r in results)
    assert next(r for r in results if r.name == "gen_step_pred").max_ref > 0


def test_auto_action_space_model() -> None:
    cfg = small_config(action_space="auto", real_action_dim=7)
    model = XVLA(cfg).eval()
    batch = make_batch(cfg)
    assert batch["action"].shape[-1] == 7
    out = model(batch)
    assert set(out.terms) == {"joints_loss"} and out.pred.shape == (2, 30, 20)
    assert model.generate(batch, steps=2).shape == (2, 30, 7)
