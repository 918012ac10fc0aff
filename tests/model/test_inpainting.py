"""Inpainting in the samplers (xvla.model.flow "Inpainting"): frozen steps are reproduced, weight 0 changes nothing,
the eager and fast samplers agree."""

from __future__ import annotations

import pytest
import torch

from xvla.model import XVLA, build_action_space
from xvla.model.fast.sampling import FastGenerator
from xvla.model.flow import OBJECTIVES, FlowObjective, Inpainting

from .model_helpers import make_batch, small_config

EE6D = build_action_space("ee6d")


def _target(b: int, t: int) -> torch.Tensor:
    """Post-processed ee6d actions [b, t, 20] with grippers strictly inside (0, 1)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, t, 20, generator=g)
    x[..., list(EE6D.gripper_idx)] = torch.rand(b, t, 2, generator=g) * 0.8 + 0.1
    return x


def _denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in network: any function of its inputs will do."""
    return torch.sin(x_t) + t.view(-1, 1, 1)


@pytest.mark.parametrize("objective", list(OBJECTIVES.values()), ids=list(OBJECTIVES))
def test_weight_one_reproduces_the_target_and_zero_changes_nothing(objective: FlowObjective) -> None:
    noise = torch.randn(2, 8, 20, generator=torch.Generator().manual_seed(0))
    target = _target(2, 8)
    weight = torch.zeros(2, 8)
    weight[:, :3] = 1.0
    weight[:, 3:5] = 0.5
    guide = objective.guidance(Inpainting(target, weight), EE6D, torch.float32)
    out = objective.finish(objective.sample(_denoiser, noise, 4, guide), EE6D)
    free = objective.finish(objective.sample(_denoiser, noise, 4), EE6D)
    torch.testing.assert_close(out[:, :3], target[:, :3], atol=1e-5, rtol=0)
    assert torch.equal(out[:, 5:], free[:, 5:])  # weight 0 on the free steps: bit-identical
    assert not torch.allclose(out[:, 3:5], free[:, 3:5])  # the soft steps are pulled
    zero = objective.guidance(Inpainting(target, torch.zeros(2, 8)), EE6D, torch.float32)
    assert torch.equal(objective.finish(objective.sample(_denoiser, noise, 4, zero), EE6D), free)


def test_x0_blend_pulls_the_soft_steps_towards_the_target() -> None:
    objective = OBJECTIVES["x0_renoise"]
    noise = torch.randn(1, 6, 20, generator=torch.Generator().manual_seed(1))
    target = _target(1, 6)
    free = objective.finish(objective.sample(_denoiser, noise, 3), EE6D)
    weight = torch.tensor([[0.0, 0.25, 0.5, 0.75, 0.9, 0.0]])
    out = objective.finish(
        objective.sample(
            _denoiser, noise, 3, objective.guidance(Inpainting(target, weight), EE6D, torch.float32)
        ),
        EE6D,
    )
    xyz = [0, 1, 2]
    # the last blend is a convex combination: the distance to the target shrinks by (1 - w)
    assert (out[0, 1:5, xyz] - target[0, 1:5, xyz]).abs().sum() < (
        free[0, 1:5, xyz] - target[0, 1:5, xyz]
    ).abs().sum()


def test_inpainting_is_checked() -> None:
    good = Inpainting(_target(2, 8), torch.ones(2, 8))
    good.check(2, 8, 20)
    with pytest.raises(ValueError, match=r"inpainting actions: expected shape \(2, 30, 20\)"):
        good.check(2, 30, 20)
    with pytest.raises(ValueError, match="inpainting weight: expected values in"):
        Inpainting(_target(2, 8), torch.full((2, 8), 2.0)).check(2, 8, 20)
    bad = _target(2, 8)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inpainting actions: contain NaN"):
        Inpainting(bad, torch.ones(2, 8)).check(2, 8, 20)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_model_eager_and_fast_samplers_inpaint_alike(name: str) -> None:
    torch.manual_seed(0)
    model = XVLA(small_config(objective=name)).eval()
    cfg = model.config
    batch = make_batch(cfg, b=2)
    noise = torch.randn(
        2, cfg.num_actions, model.action_space.dim, generator=torch.Generator().manual_seed(2)
    )
    target = _target(2, cfg.num_actions)
    weight = torch.zeros(2, cfg.num_actions)
    weight[0, :4] = 1.0  # the second sample is unconstrained
    inpaint = Inpainting(target, weight)
    eager = model.generate(batch, steps=3, noise=noise, inpaint=inpaint)
    fast = FastGenerator(model)(batch, steps=3, noise=noise, inpaint=inpaint)
    free = model.generate(batch, steps=3, noise=noise)
    torch.testing.assert_close(eager[0, :4], target[0, :4], atol=1e-5, rtol=0)
    assert torch.equal(eager[1], free[1])
    torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-4)
