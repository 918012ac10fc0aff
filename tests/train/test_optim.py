"""Optimiser recipe: per-group learning rates, warm-up + cosine schedule, freezing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xvla.train.config import OptimConfig
from xvla.train.optim import build_optimizer, build_scheduler, check_groups, lr_factor, set_trainable


def _groups() -> tuple[nn.Module, dict[str, list[nn.Parameter]]]:
    model = nn.ModuleDict(
        {n: nn.Linear(2, 2) for n in ("vlm", "transformer", "soft_prompts", "action_heads")}
    )
    return model, {n: list(m.parameters()) for n, m in model.items()}


def test_group_lrs_follow_coefficients_and_schedule():
    _, groups = _groups()
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    opt = build_optimizer(groups, cfg, device_type="cpu")
    assert opt.defaults["betas"] == (0.9, 0.95)
    sched = build_scheduler(opt, cfg, total_steps=110)
    peak = {g["name"]: g["initial_lr"] for g in opt.param_groups}
    assert peak == pytest.approx(
        {"vlm": 1e-4, "transformer": 1e-3, "soft_prompts": 1e-4, "action_heads": 1e-3}
    )
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert all(a <= b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # cosine decay
    assert lr_factor(110, total_steps=110, warmup_steps=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(60, total_steps=110, warmup_steps=10, min_ratio=0.1) == pytest.approx(0.55)
    assert math.isclose(opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"], 0.1)


def test_adamw_is_fused_on_cpu_unless_told_otherwise():
    _, groups = _groups()
    assert build_optimizer(groups, OptimConfig(), device_type="cpu").defaults["fused"] is True
    assert build_optimizer(groups, OptimConfig(fused=False), device_type="cpu").defaults["fused"] is False
    assert not build_optimizer(groups, OptimConfig(), device_type="mps").defaults["fused"]


def test_groups_joining_after_the_prompt_warmup_warm_up_when_they_join():
    """Backbone groups frozen for the first 20 steps start their own linear warm-up at step 20 (a fixed-start
    schedule would hand them the full rate at once); prompt/head groups follow the run's schedule."""
    _, groups = _groups()
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    opt = build_optimizer(groups, cfg, device_type="cpu")
    sched = build_scheduler(opt, cfg, total_steps=120, start_steps={"vlm": 20, "transformer": 20})
    lrs: dict[str, list[float]] = {g["name"]: [] for g in opt.param_groups}
    for _ in range(120):
        for g in opt.param_groups:
            lrs[g["name"]].append(g["lr"])
        opt.step()
        sched.step()
    assert lrs["transformer"][20] == pytest.approx(1e-4) and lrs["transformer"][29] == pytest.approx(1e-3)
    assert lrs["action_heads"][9] == pytest.approx(1e-3) and lrs["action_heads"][20] < 1e-3
    assert lrs["transformer"][-1] == pytest.approx(1e-4, rel=0.05)  # both decay to the floor by the end
    assert lrs["action_heads"][-1] == pytest.approx(1e-4, rel=0.05)


def test_set_trainable_freezes_other_groups():
    model, groups = _groups()
    set_trainable(groups, ["soft_prompts", "action_heads"])
    out = sum(m(torch.ones(1, 2)).sum() for m in model.values())
    out.backward()
    assert all(p.grad is None for p in groups["vlm"] + groups["transformer"])
    assert all(p.grad is not None for p in groups["soft_prompts"] + groups["action_heads"])
    with pytest.raises(ValueError, match="unknown parameter groups"):
        set_trainable(groups, ["prompts"])


def test_check_groups_finds_orphans():
    model, groups = _groups()
    del groups["vlm"]
    with pytest.raises(ValueError, match="belong to no parameter group"):
        check_groups(model, groups)
