"""`xvla.demo.config`: the scales, typed `--set` overrides, and validation naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from xvla.demo import SCALES, DemoConfig, demo_config


def test_scales_are_valid_and_json_round_trip() -> None:
    for name, cfg in SCALES.items():
        assert cfg.scale == name
        assert DemoConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    default = SCALES["default"]
    assert default.target_s == 25 * 60  # the promise of the default scale (issue #12); the report checks it
    assert SCALES["cpu-long"].target_s == 2 * 3600
    assert SCALES["smoke"].pretrain_steps < default.pretrain_steps < SCALES["small"].pretrain_steps


def test_overrides_are_typed_and_named() -> None:
    cfg = demo_config(
        "smoke",
        [
            "pretrain_steps=7",
            "lr=1e-3",
            "adapt_mode=lora",
            "scratch_baseline=true",
            "pretrain_sources=[rs_panda, rs_ur5e]",
        ],
    )
    assert (cfg.pretrain_steps, cfg.lr, cfg.adapt_mode, cfg.scratch_baseline) == (7, 1e-3, "lora", True)
    assert cfg.pretrain_sources == ("rs_panda", "rs_ur5e")
    with pytest.raises(ValueError, match="pretrain_step"):
        demo_config("smoke", ["pretrain_step=7"])
    with pytest.raises(ValueError, match="pretrain_steps: expected int"):
        demo_config("smoke", ["pretrain_steps=many"])
    with pytest.raises(ValueError, match="scale: unknown 'huge'"):
        demo_config("huge")
    # Optional fields take a number (YAML 1.1 reads 1e-3 as a string) or null.
    assert demo_config("smoke", ["ema_decay=1e-3", "target_s=null"]).ema_decay == 1e-3
    assert demo_config("smoke", ["target_s=null"]).target_s is None
    with pytest.raises(ValueError, match="ema_decay: \\[1\\] matches none of"):
        demo_config("smoke", ["ema_decay=[1]"])
    with pytest.raises(ValueError, match="ema_decay: expected None or a value in"):
        demo_config("smoke", ["ema_decay=2"])
    assert demo_config("smoke", ["source_episodes.rs_panda=4"]).source_episodes == {"rs_panda": 4}
    with pytest.raises(ValueError, match="source_episodes: 'so100_bimanual' is not a pre-training source"):
        demo_config("smoke", ["source_episodes.so100_bimanual=40"])
    with pytest.raises(
        ValueError, match=r"source_episodes\['rs_panda'\]: expected an integer > val_episodes"
    ):
        demo_config("smoke", ["source_episodes.rs_panda=1"])
    assert demo_config("smoke", ["noise_scale=0"]).noise_scale == 0.0
    with pytest.raises(ValueError, match=r"DemoConfig.noise_scale: expected a value in \[0, 1\], got -1"):
        demo_config("smoke", ["noise_scale=-1"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adapt_prompt_steps": DemoConfig().adapt_steps}, "adapt_prompt_steps"),  # must leave stage-2 steps
        ({"val_episodes": DemoConfig().episodes}, "val_episodes"),  # must leave training episodes
        ({"adapt_mode": "half"}, "adapt_mode"),
        ({"sampling": "uniform"}, "DemoConfig.sampling: expected one of \\('balanced', 'frames'\\)"),
        ({"pretrain_domains": "one"}, "pretrain_domains"),
        ({"targets": "frames"}, "targets"),
        (
            {"adapt_init": "rs_kinova3"},
            "DemoConfig.adapt_init: expected one of \\('retrieval', 'scratch'\\) or a pre-training",
        ),
        ({"episodes": 0}, "episodes"),
        ({"budget_s": {"train": 1.0}}, "budget_s"),
        ({"augment": [1]}, "augment"),
        (
            {"source_weights": {"rs_kinova3": 2.0}},
            "source_weights: 'rs_kinova3' is not a pre-training source",
        ),
        (
            {"source_weights": {"rs_panda": 0.0}},
            "source_weights\\['rs_panda'\\]: expected a finite number > 0",
        ),
    ],
)
def test_invalid_configs_name_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**changes)
