"""Parity with the authors' and LeRobot's fixtures, through the `xvla parity` command."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import fixture_dir
from xvla.cli import main
from xvla.model import XVLA
from xvla.model.parity import refs_batch, run_parity

torch.set_num_threads(1)  # the CI machine has 2 shared cores


@pytest.mark.parametrize(
    ("name", "layout"), [("xvla_official_tiny", "authors"), ("xvla_lerobot_tiny", "lerobot")]
)
def test_parity_cli_passes(name: str, layout: str, capsys: pytest.CaptureFixture[str]) -> None:
    folder = fixture_dir(name)
    assert main(["parity", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint layout: {layout}" in out
    for key in ("vlm_features", "denoise_pre_out", "loss_total", "gen_actions", "gen_step_pred"):
        assert f"ok   {key}" in out
    if layout == "lerobot":
        assert "ok   pol_gen_actions" in out and "ok   pol_loss_total" in out


def test_corrupted_weight_fails_parity(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = fixture_dir("xvla_official_tiny")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    state["transformer.norm.weight"] = state["transformer.norm.weight"] + 1e-3
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert main(["parity", str(tmp_path), "--refs", str(folder / "refs.safetensors")]) == 1
    assert "FAIL denoise_raw_out" in capsys.readouterr().out


def test_authors_layout_to_ours_roundtrip(tmp_path) -> None:
    folder = fixture_dir("xvla_official_tiny")
    authors = XVLA.from_pretrained(folder)
    authors.save_pretrained(tmp_path / "ours")
    ours = XVLA.from_pretrained(tmp_path / "ours")
    refs = load_file(str(folder / "refs.safetensors"))
    batch = refs_batch(refs)
    noise = refs["gen_x1_noise"]
    assert torch.equal(ours.generate(batch, noise=noise), authors.generate(batch, noise=noise))
    results, layout = run_parity(tmp_path / "ours", folder / "refs.safetensors")
    assert layout == "xvla" and all(r.ok for r in results)


def test_cli_errors_are_reported(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["parity", str(tmp_path)]) == 2
    assert "refs.safetensors not found" in capsys.readouterr().err
    folder = fixture_dir("xvla_lerobot_tiny")
    assert main(["parity", str(folder), "--refs", str(tmp_path / "none.safetensors")]) == 2
    assert "none.safetensors not found" in capsys.readouterr().err
    assert main(["info", "--config", str(folder)]) == 0
    assert "2,725,496" in capsys.readouterr().out


def test_minimal_florence_config_reads_like_the_full_one() -> None:
    import json

    from xvla.model.layouts import config_from_layout

    raw = json.loads((fixture_dir("xvla_official_tiny") / "config.json").read_text())
    fc = raw["florence_config"]
    vision_keys = ("dim_embed", "num_heads", "num_groups", "depths", "window_size", "image_pos_embed")
    text_keys = ("vocab_size", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim")
    minimal = {
        "projection_dim": fc["projection_dim"],
        "vision_config": {k: fc["vision_config"][k] for k in vision_keys},
        "text_config": {k: fc["text_config"][k] for k in text_keys},
    }
    assert config_from_layout({**raw, "florence_config": minimal}, "authors") == config_from_layout(
        raw, "authors"
    )
    lerobot = json.loads((fixture_dir("xvla_lerobot_tiny") / "config.json").read_text())
    assert config_from_layout(lerobot, "lerobot") == config_from_layout(raw, "authors")
