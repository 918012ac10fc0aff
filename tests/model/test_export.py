"""`xvla export`: the exported folders match what LeRobot and the authors write, read back to identical actions,
and what a layout cannot hold is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import fixture_dir
from xvla.cli import main
from xvla.config import HeadConfig, XVLAConfig, get_preset
from xvla.model import XVLA
from xvla.model.checkpoint import SOURCES_NAME
from xvla.model.export import export_checkpoint, uncarried_fields
from xvla.model.layouts import config_to_authors, config_to_lerobot

from .model_helpers import small_config

torch.set_num_threads(1)
# Sizes and options LeRobot's layout holds, none at the released value: 64 px, 2 views, 16 actions, 12 tokens,
# 4 steps, a 10-d proprio, the auto action space with 7 real dims.
SMALL_AUTO = {
    "action_space": "auto",
    "real_action_dim": 7,
    "num_views": 2,
    "num_actions": 16,
    "proprio_dim": 10,
}


def _save(tmp: Path, config: XVLAConfig, name: str = "ckpt") -> Path:
    torch.manual_seed(0)
    model = XVLA(config).eval()
    with torch.no_grad():  # no all-equal tensors: a dropped bias or affine would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp / name)
    return tmp / name


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _weights(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sorted(f.keys()), f.metadata()


def _actions(folder: Path, cfg: XVLAConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.randn(1, cfg.num_views, 3, cfg.image_size, cfg.image_size, generator=g),
        "image_mask": torch.ones(1, cfg.num_views, dtype=torch.bool),
        "input_ids": torch.randint(3, cfg.text.vocab_size, (1, cfg.max_text_len), generator=g),
        "domain_id": torch.tensor([cfg.head.num_domains - 1]),
        "proprio": torch.randn(1, cfg.proprio_dim, generator=g),
    }
    model = XVLA.from_pretrained(folder)
    assert model.config == cfg
    noise = torch.randn(1, cfg.num_actions, model.action_space.dim, generator=g)
    return model.generate(batch, steps=2, noise=noise)


# ---------------------------------------------------------------------------------------- schema (shared fixtures)
def test_lerobot_export_writes_what_lerobot_writes(tmp_path: Path) -> None:
    fixture = fixture_dir("xvla_lerobot_tiny")
    assert main(["export", str(fixture), str(tmp_path / "out"), "--layout", "lerobot"]) == 0
    out = tmp_path / "out"
    got, want = _json(out / "config.json"), _json(fixture / "config.json")
    assert list(got) == list(want)  # every field, in draccus' order
    # The one difference: the fixture declares a 10-d robot state that LeRobot pads, ours the canonical proprio.
    assert want["input_features"].pop("observation.state")["shape"] == [10]
    assert got["input_features"].pop("observation.state")["shape"] == [20]
    assert {k: v for k, v in got.items() if k != "florence_config"} == {
        k: v for k, v in want.items() if k != "florence_config"
    }
    assert _weights(out) == _weights(fixture)  # key names and the tied-alias metadata
    theirs = load_file(str(fixture / "model.safetensors"))
    assert all(torch.equal(v, theirs[k]) for k, v in load_file(str(out / "model.safetensors")).items())
    for name in ("policy_preprocessor.json", "policy_postprocessor.json"):
        got_p, want_p = _json(out / name), _json(fixture / name)
        for p in (got_p, want_p):  # the same state-width difference
            for step in p["steps"]:
                step["config"].get("features", {}).pop("observation.state", None)
        assert got_p == want_p


def test_authors_export_writes_what_the_authors_write(tmp_path: Path) -> None:
    fixture = fixture_dir("xvla_official_tiny")
    export_checkpoint(fixture, tmp_path / "out", "authors")
    got, want = _json(tmp_path / "out" / "config.json"), _json(fixture / "config.json")
    assert list(got) == list(want)
    for key in ("florence_config", "transformers_version"):
        got.pop(key), want.pop(key)
    assert got == want
    assert _weights(tmp_path / "out") == _weights(fixture)  # incl. {"format": "pt"}
    theirs = load_file(str(fixture / "model.safetensors"))
    assert all(
        torch.equal(v, theirs[k]) for k, v in load_file(str(tmp_path / "out/model.safetensors")).items()
    )


def test_florence_config_is_a_subset_of_the_authors_one(tmp_path: Path) -> None:
    fixture = fixture_dir("xvla_official_tiny")
    export_checkpoint(fixture, tmp_path / "out", "authors")
    got = _json(tmp_path / "out" / "config.json")["florence_config"]
    want = _json(fixture / "config.json")["florence_config"]
    for sub in ("vision_config", "text_config"):
        ours = got.pop(sub)
        assert ours == {k: want[sub][k] for k in ours}
    assert got == {k: want[k] for k in got}


# ------------------------------------------------------------------------------------- round trips: same actions
@pytest.mark.parametrize("layout", ["lerobot", "authors"])
@pytest.mark.parametrize("name", ["xvla_official_tiny", "xvla_lerobot_tiny"])
def test_fixture_round_trip_gives_identical_actions(tmp_path: Path, name: str, layout: str) -> None:
    fixture = fixture_dir(name)
    XVLA.from_pretrained(fixture).save_pretrained(tmp_path / "ours")
    export_checkpoint(tmp_path / "ours", tmp_path / "exported", layout)
    XVLA.from_pretrained(tmp_path / "exported").save_pretrained(tmp_path / "back")
    cfg = XVLA.from_pretrained(tmp_path / "ours").config
    assert torch.equal(_actions(tmp_path / "back", cfg), _actions(tmp_path / "ours", cfg))
    assert torch.equal(_actions(tmp_path / "exported", cfg), _actions(fixture, cfg))


def test_tiny_model_round_trip_through_lerobot(tmp_path: Path) -> None:
    cfg = small_config(**SMALL_AUTO)
    ours = _save(tmp_path, cfg)
    (ours / SOURCES_NAME).write_text(json.dumps({"arm": {"domain_id": 2}}))
    assert (
        main(["export", str(ours), str(tmp_path / "le"), "--layout", "lerobot", "--tokenizer-name", "tok"])
        == 0
    )
    steps = {
        s["registry_name"]: s["config"] for s in _json(tmp_path / "le" / "policy_preprocessor.json")["steps"]
    }
    assert steps["xvla_add_domain_id"] == {"domain_id": 2}  # the only source's domain
    assert steps["tokenizer_processor"]["tokenizer_name"] == "tok"
    assert steps["tokenizer_processor"]["max_length"] == cfg.max_text_len
    assert (tmp_path / "le" / SOURCES_NAME).is_file()
    assert torch.equal(_actions(tmp_path / "le", cfg), _actions(ours, cfg))


def test_tiny_model_round_trip_through_the_authors_layout(tmp_path: Path) -> None:
    cfg = get_preset("tiny")  # the authors' config holds no view count, image size, text length or step count
    ours = _save(tmp_path, cfg)
    export_checkpoint(ours, tmp_path / "au", "authors")
    assert torch.equal(_actions(tmp_path / "au", cfg), _actions(ours, cfg))


def test_bfloat16_weights_export_as_bfloat16(tmp_path: Path) -> None:
    model = XVLA(small_config(**SMALL_AUTO)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    export_checkpoint(tmp_path / "bf16", tmp_path / "le", "lerobot", tokenizer_name="tok")
    assert _json(tmp_path / "le" / "config.json")["dtype"] == "bfloat16"
    assert all(
        v.dtype == torch.bfloat16 for v in load_file(str(tmp_path / "le" / "model.safetensors")).values()
    )


# ------------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"proprio_gripper": True}, "proprio_gripper=True (loads as False: their models always zero"),
        ({"objective": "velocity"}, "objective='velocity' (loads as 'x0_renoise'"),
        ({"mask_text_padding": True}, "mask_text_padding=True"),
        ({"mask_missing_views": True}, "mask_missing_views=True"),
        (
            {
                "head": HeadConfig(
                    hidden_size=32,
                    depth=2,
                    num_heads=4,
                    num_domains=4,
                    len_soft_prompts=4,
                    max_len_seq=128,
                    dropout=0.0,
                )
            },
            "head.dropout=0.0 (loads as 0.1",
        ),
    ],
)
def test_options_without_a_counterpart_are_named(changes: dict[str, Any], field: str) -> None:
    cfg = small_config(**changes)
    assert any(
        f.startswith(field) for f in uncarried_fields(cfg, config_to_lerobot(cfg, "float32", "t"), "lerobot")
    )


def test_the_authors_layout_holds_no_runtime_sizes() -> None:
    cfg = small_config()  # 64 px, 12 tokens
    fields = uncarried_fields(cfg, config_to_authors(cfg, "float32", "5"), "authors")
    assert {f.split("=")[0] for f in fields} == {"image_size", "max_text_len"}
    assert (
        uncarried_fields(get_preset("tiny"), config_to_authors(get_preset("tiny"), "float32", "5"), "authors")
        == []
    )
    demo = get_preset("demo")  # exact GELU in the head, no head dropout: neither layout holds them
    names = {
        f.split("=")[0] for f in uncarried_fields(demo, config_to_lerobot(demo, "float32", "t"), "lerobot")
    }
    assert {"head.activation", "head.dropout"} <= names
    keypoints = demo.replace(vision=dataclasses.replace(demo.vision, keypoints=4))
    for layout, convert in (("lerobot", config_to_lerobot), ("authors", config_to_authors)):
        fields = uncarried_fields(keypoints, convert(keypoints, "float32", "t"), layout)
        assert "vision.keypoints" in {f.split("=")[0] for f in fields}


def test_cli_refuses_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = _save(tmp_path, small_config(proprio_gripper=True))
    assert (
        main(["export", str(ours), str(tmp_path / "out"), "--layout", "lerobot", "--tokenizer-name", "t"])
        == 2
    )
    err = capsys.readouterr().err
    assert "xvla export: error: the lerobot layout cannot hold this checkpoint's proprio_gripper=True" in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left either


def test_cli_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ours = _save(tmp_path, small_config(**SMALL_AUTO))
    assert main(["export", str(ours), str(tmp_path / "x")]) == 2
    assert "--layout lerobot|authors is required" in capsys.readouterr().err
    assert main(["export", str(ours), str(tmp_path / "x"), "--layout", "authors", "--domain", "1"]) == 2
    assert "the authors' layout has none" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    assert (
        main(["export", str(ours), str(tmp_path / "full"), "--layout", "lerobot", "--tokenizer-name", "t"])
        == 2
    )
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "x"), "--layout", "lerobot"]) == 2
    assert "not found" in capsys.readouterr().err


def test_onnx_format_goes_to_the_onnx_exporter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from xvla.model import onnx_export

    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(onnx_export, "export_onnx", lambda ckpt, out: calls.append((ckpt, out)))
    assert main(["export", str(tmp_path), str(tmp_path / "x"), "--format", "onnx"]) == 0
    assert calls == [(str(tmp_path), str(tmp_path / "x"))]
    assert (
        main(["export", str(tmp_path), str(tmp_path / "x"), "--format", "onnx", "--layout", "lerobot"]) == 2
    )
    assert "apply to --format safetensors only" in capsys.readouterr().err


def test_tokenizer_and_domain_must_be_said_when_they_cannot_be_guessed(tmp_path: Path) -> None:
    ours = _save(tmp_path, small_config(**SMALL_AUTO))  # vocabulary 300, no tokenizer files
    with pytest.raises(
        ValueError, match="vocabulary \\(300\\) is smaller than facebook/bart-large's.*--tokenizer-name"
    ):
        export_checkpoint(ours, tmp_path / "a", "lerobot")
    (ours / SOURCES_NAME).write_text(json.dumps({"left": {"domain_id": 1}, "right": {"domain_id": 3}}))
    with pytest.raises(ValueError, match=r"2 sources: pass --domain NAME or ID \(left \(1\), right \(3\)\)"):
        export_checkpoint(ours, tmp_path / "a", "lerobot", tokenizer_name="t")
    with pytest.raises(ValueError, match=r"expected an id in \[0, 4\), got 7"):
        export_checkpoint(ours, tmp_path / "a", "lerobot", tokenizer_name="t", domain="7")
    with pytest.raises(ValueError, match="'middle' is neither a domain id nor a source"):
        export_checkpoint(ours, tmp_path / "a", "lerobot", tokenizer_name="t", domain="middle")
    export_checkpoint(ours, tmp_path / "a", "lerobot", tokenizer_name="t", domain="right")
    steps = _json(tmp_path / "a" / "policy_preprocessor.json")["steps"]
    assert {"domain_id": 3} in [s["config"] for s in steps]


def test_a_checkpoint_with_its_own_tokenizer_needs_its_name(tmp_path: Path) -> None:
    from xvla.model.tokenizer import build_tokenizer

    ours = _save(tmp_path, small_config(**SMALL_AUTO))
    build_tokenizer(ours, vocab_size=300)
    with pytest.raises(
        ValueError, match="this checkpoint's has \\d+ base tokens, facebook/bart-large's 50265"
    ):
        export_checkpoint(ours, tmp_path / "a", "lerobot")
    export_checkpoint(ours, tmp_path / "a", "lerobot", tokenizer_name=str(tmp_path / "a"))
    assert (tmp_path / "a" / "tokenizer.json").is_file()  # copied: the folder names itself


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    ours = _save(tmp_path, small_config(**SMALL_AUTO))
    state = load_file(str(ours / "model.safetensors"))
    state["transformer.norm.weight"][0] = float("nan")
    save_file(state, str(ours / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="non-finite values"):
        export_checkpoint(ours, tmp_path / "a", "lerobot", tokenizer_name="t")
    assert not (tmp_path / "a").exists()
