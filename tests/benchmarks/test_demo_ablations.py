"""benchmarks/demo_ablations.py: every named arm is a valid change to the default scale, and the arms that change
only the adaptation keep the pre-training key (so `--pretrained` accepts them)."""

from __future__ import annotations

import pytest

from .scripts import load_script

ABL = load_script("demo_ablations")


@pytest.mark.parametrize("name", sorted(ABL.ARMS))
def test_every_arm_is_a_valid_config(name: str) -> None:
    cfg = ABL.demo.SCALES["default"].replace(**ABL.ARMS[name])
    changed = set(ABL.ARMS[name])
    base = ABL.demo.SCALES["default"]
    same_pretraining = ABL.training_key(cfg) == ABL.training_key(base)
    assert same_pretraining == (changed <= ABL.EVAL_FIELDS | ABL.ADAPT_FIELDS), name


def test_adaptation_arms_change_the_adaptation_key() -> None:
    base = ABL.demo.SCALES["default"]
    for name in ("adapt-init-ur5e", "adapt-lr5e-4"):
        cfg = base.replace(**ABL.ARMS[name])
        assert ABL.training_key(cfg) == ABL.training_key(base)
        assert ABL.training_key(cfg, adaptation=True) != ABL.training_key(base, adaptation=True)
