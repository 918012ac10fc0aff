"""TrainConfig: file round trip, dotted overrides, and errors that name the offending key."""

from __future__ import annotations

import json

import pytest
import yaml

from xvla.configio import ConfigError, from_dict, load_config, save_config, to_dict
from xvla.train.config import AdaptConfig, TrainConfig


def test_json_and_yaml_round_trip(tmp_path):
    cfg = from_dict(TrainConfig, {"steps": 7, "optim": {"betas": [0.8, 0.9]}, "data": {"mixture": "m.yaml"}})
    save_config(cfg, tmp_path / "c.json")
    assert load_config(TrainConfig, tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(TrainConfig, tmp_path / "c.yaml") == cfg
    assert cfg.optim.betas == (0.8, 0.9)


def test_overrides_are_typed_and_nested(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"steps": 3}))
    cfg = load_config(
        TrainConfig,
        tmp_path / "c.json",
        [
            "optim.lr=3e-4",
            "optim.lr_scale.vlm=0.5",
            "checkpoint.ema_decay=0.99",
            "model.overrides.image_size=64",
        ],
    )
    assert cfg.steps == 3 and cfg.optim.lr == 3e-4 and cfg.optim.lr_scale.vlm == 0.5
    assert cfg.checkpoint.ema_decay == 0.99 and cfg.model.overrides == {"image_size": 64}
    (tmp_path / "a.yaml").write_text("mode: full\n")
    adapt = load_config(AdaptConfig, tmp_path / "a.yaml", ["train.steps=5", "lora.targets=[qkv, fc1]"])
    assert adapt.mode == "full" and adapt.train.steps == 5 and adapt.lora.targets == ["qkv", "fc1"]


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"optm": {}}, [], "unknown config key 'optm'; did you mean optim?"),
        ({}, ["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean lr"),
        ({}, ["checkpoint.keep=2"], "did you mean keep_last"),
        ({"steps": "many"}, [], "steps: expected int"),
        ({"precision": "fp8"}, [], "precision: expected one of"),
        ({}, ["steps"], "expected KEY=VALUE"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, data, overrides, message):
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_config(TrainConfig, tmp_path / "c.json", overrides)


def test_validate_names_field():
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(grad_accum=0).validate()
