"""`xvla.model.layouts`: each layout's key mapping and config translation read back what they write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import fixture_dir
from xvla.config import get_preset
from xvla.model.layouts import (
    AUTHORS_EMBEDDING,
    FINAL_LOGITS_BIAS,
    LEROBOT_EMBEDDING,
    LEROBOT_PREFIX,
    VENDORED_PROJECTION,
    config_from_layout,
    config_to_authors,
    config_to_lerobot,
    native_to_vendored,
    state_from_layout,
    state_to_layout,
    vendored_to_native,
)

from .model_helpers import small_config

torch.set_num_threads(1)


def _keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name", ["xvla_official_tiny", "xvla_lerobot_tiny"])
def test_every_fixture_key_maps_to_ours_and_back(name: str) -> None:
    keys = [k.removeprefix(LEROBOT_PREFIX) for k in _keys(fixture_dir(name))]
    special = {
        FINAL_LOGITS_BIAS,
        VENDORED_PROJECTION,
        LEROBOT_EMBEDDING,
    }  # dropped, transposed, the other alias
    renamed = [k for k in keys if k not in special and vendored_to_native(k) != k]
    assert len(renamed) >= 170  # the whole Florence-2 part but the 8 `convs.{s}.norm` tensors
    for key in keys:
        if key not in special:
            assert native_to_vendored(vendored_to_native(key)) == key
    assert vendored_to_native(LEROBOT_EMBEDDING) == vendored_to_native(AUTHORS_EMBEDDING)


def test_native_names_that_look_alike_map_to_different_vendored_names() -> None:
    block = "vlm.vision_tower.blocks.2.0"
    assert (
        native_to_vendored(f"{block}.spatial_block.norm1.weight")
        == f"{block}.spatial_block.window_attn.norm.weight"
    )
    assert (
        native_to_vendored(f"{block}.channel_block.norm1.weight")
        == f"{block}.channel_block.channel_attn.norm.weight"
    )
    assert native_to_vendored(f"{block}.spatial_block.norm2.bias") == f"{block}.spatial_block.ffn.norm.bias"
    assert (
        native_to_vendored(f"{block}.channel_block.ffn.fc1.bias")
        == f"{block}.channel_block.ffn.fn.net.fc1.bias"
    )
    assert native_to_vendored("transformer.blocks.0.norm1.weight") == "transformer.blocks.0.norm1.weight"


@pytest.mark.parametrize("layout", ["authors", "lerobot"])
def test_state_round_trip_is_bit_identical(layout: str) -> None:
    from xvla.model import XVLA

    torch.manual_seed(0)
    state = XVLA(small_config()).state_dict()
    written = state_to_layout(state, layout)  # type: ignore[arg-type]
    projection = (LEROBOT_PREFIX if layout == "lerobot" else "") + VENDORED_PROJECTION
    assert written[projection].shape == state["vlm.multi_modal_projector.image_projection.weight"].t().shape
    back = state_from_layout(written, layout, "test")  # type: ignore[arg-type]
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_a_foreign_key_without_the_lerobot_prefix_is_an_error() -> None:
    with pytest.raises(ValueError, match="lacks the 'model.' prefix"):
        state_from_layout({"vlm.image_projection": torch.zeros(2, 2)}, "lerobot", "x.safetensors")


def test_configs_read_back_as_written() -> None:
    tiny = get_preset("tiny")
    assert config_from_layout(config_to_authors(tiny, "float32", "5"), "authors") == tiny
    # LeRobot holds the view count, image size, chunk, text length, steps and proprio width; auto's real width
    # is the action feature's
    cfg = small_config(action_space="auto", real_action_dim=7, num_views=2, num_actions=16, proprio_dim=10)
    raw = config_to_lerobot(cfg, "float32", "tok")
    assert raw["output_features"]["action"]["shape"] == [7]
    assert config_from_layout(raw, "lerobot") == cfg


def test_lerobot_image_size_comes_from_resizing_or_the_features() -> None:
    raw = config_to_lerobot(small_config(), "float32", "tok")  # 64 px features, no resizing
    assert config_from_layout(raw, "lerobot").image_size == 64
    raw["max_len_seq"] = 512  # room for 224 px views
    assert config_from_layout({**raw, "resize_imgs_with_padding": [224, 224]}, "lerobot").image_size == 224
    feats = {**raw["input_features"], "observation.images.image2": {"type": "VISUAL", "shape": [3, 64, 96]}}
    assert (
        config_from_layout({**raw, "input_features": feats}, "lerobot").image_size == 224
    )  # mixed: released
