"""Bad input raises errors that name the field and the expectation."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from xvla.model import XVLA, build_action_space

from .model_helpers import build_small_model, make_batch, small_config


def _run(model: XVLA, batch: dict[str, torch.Tensor]) -> None:
    model(batch)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda b: b.update(
                pixel_values=torch.zeros(2, 4, 3, 64, 64), image_mask=torch.ones(2, 4, dtype=torch.bool)
            ),
            "views",
        ),
        (lambda b: b.update(pixel_values=torch.zeros(2, 3, 3, 96, 96)), "64x64"),
        (lambda b: b.update(proprio=torch.zeros(2, 14)), r"proprio: expected shape \(2, 20\)"),
        (lambda b: b.update(action=torch.zeros(2, 30, 14)), r"action: expected shape \(2, 30, 20\)"),
        (lambda b: b.update(domain_id=torch.tensor([0, 4])), r"domain_id: expected values in \[0, 4\)"),
        (lambda b: b["proprio"].__setitem__((0, 0), float("nan")), "proprio: contains NaN or inf"),
        (lambda b: b["proprio"].__setitem__((1, 3), float("inf")), "proprio: contains NaN or inf"),
        (lambda b: b.update(input_ids=torch.zeros(2, 40, dtype=torch.long)), "input_ids"),
    ],
)
def test_bad_batch(mutate, match: str) -> None:
    small_model = build_small_model()
    batch = make_batch(small_model.config)
    mutate(batch)
    with pytest.raises(ValueError, match=match):
        _run(small_model, batch)


def test_unknown_action_space_lists_known() -> None:
    with pytest.raises(
        ValueError, match=r"unknown action space 'ee7d'.*\['agibot_ee6d', 'auto', 'ee6d', 'joint'\]"
    ):
        build_action_space("ee7d")
    with pytest.raises(ValueError, match="unknown action space"):
        XVLA(small_config(action_space="nope"))


def test_mismatched_checkpoint_keys(tmp_path) -> None:
    small_model = build_small_model()
    small_model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.extra.weight"] = torch.zeros(1)
    del state["transformer.norm.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"missing keys \['transformer.norm.bias'\].*unexpected keys \['transformer.extra.weight'\]",
    ):
        XVLA.from_pretrained(tmp_path)


def test_shape_mismatch_in_checkpoint(tmp_path) -> None:
    small_model = build_small_model()
    small_model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.norm.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch transformer.norm.bias: file \(7,\)"):
        XVLA.from_pretrained(tmp_path)


def test_bad_config_fields() -> None:
    with pytest.raises(
        ValueError, match=re.escape("unknown objective 'ddpm'; known objectives: ['velocity', 'x0")
    ):
        XVLA(small_config(objective="ddpm"))
    with pytest.raises(ValueError, match="unknown config key .XVLAConfig.not_a_field."):
        type(small_config()).from_dict({"not_a_field": 1})


def test_bad_injected_draws() -> None:
    small_model = build_small_model()
    batch = make_batch(small_model.config)
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 30, 20\)"):
        small_model(batch, noise=torch.zeros(2, 30, 14))
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        small_model(batch, t=torch.zeros(3))
    with pytest.raises(ValueError, match=r"noise: expected shape \(2, 30, 20\)"):
        small_model.generate(batch, noise=torch.zeros(1, 30, 20))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad: float) -> None:
    small_model = build_small_model()
    small_model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["transformer.norm.bias"][3] = bad
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: non-finite values .* 1 tensor\(s\): \['transformer.norm.bias'\]",
    ):
        XVLA.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_are_a_one_line_error_naming_the_file(tmp_path, damage: str) -> None:
    """safetensors' own message ("Error while deserializing header") does not say which file (issue 14 D13)."""
    build_small_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(
        ValueError, match="^" + re.escape(f"{weights}: corrupt or truncated safetensors file")
    ) as info:
        XVLA.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
