"""The flow objectives on their own (xvla.model.flow): noisy inputs, targets, losses, samplers, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from xvla.model import XVLA, ActionSpace, build_action_space
from xvla.model.fast.sampling import FastGenerator
from xvla.model.flow import OBJECTIVES, FlowObjective, Velocity, get_objective, stratified_t

from .model_helpers import make_batch, small_config

X0, VELOCITY = OBJECTIVES["x0_renoise"], OBJECTIVES["velocity"]


def _draws(b: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 20, generator=g), torch.randn(b, 4, 20, generator=g)


def test_registry_resolves_names_and_lists_them_when_unknown() -> None:
    assert set(OBJECTIVES) == {"x0_renoise", "velocity"}
    assert all(get_objective(name) is obj and obj.name == name for name, obj in OBJECTIVES.items())
    with pytest.raises(
        ValueError, match=r"unknown objective 'ddpm'; known objectives: \['velocity', 'x0_renoise'\]"
    ):
        get_objective("ddpm")


def test_stratified_t_spreads_one_draw_and_wraps_below_one() -> None:
    t = stratified_t(torch.tensor([0.25]), 4)
    torch.testing.assert_close(
        t, torch.tensor([0.25, 0.5, 0.75, 1e-5]), atol=1e-6, rtol=0
    )  # 1.0 wraps to 1e-5


@pytest.mark.parametrize(("objective", "noise_end"), [(X0, 1.0), (VELOCITY, 0.0)])
def test_noisy_input_interpolates_between_action_and_noise(
    objective: FlowObjective, noise_end: float
) -> None:
    action, noise = _draws()
    x_t = objective.noisy(action, noise, torch.tensor([noise_end, 1 - noise_end, 0.25]))
    assert torch.equal(x_t[0], noise[0]) and torch.equal(x_t[1], action[1])
    w = 0.25 if objective is X0 else 0.75  # the noise's weight at t = 0.25
    torch.testing.assert_close(x_t[2], w * noise[2] + (1 - w) * action[2])


def test_targets_and_losses() -> None:
    action, noise = _draws()
    space = build_action_space("ee6d")
    assert torch.equal(X0.target(action, noise), action)
    assert X0.loss_terms(action + 1, action, space).keys() == space.loss_terms(action, action).keys()
    target = VELOCITY.target(action, noise)
    assert torch.equal(target, action - noise)
    pred = target + torch.tensor([1.0, 2.0, 0.0])[:, None, None]
    terms = VELOCITY.loss_terms(pred, target, space)
    assert list(terms) == ["velocity_loss"]
    torch.testing.assert_close(terms["velocity_loss"], torch.tensor([1.0, 4.0, 0.0]))  # MSE per sample


def test_x0_sampler_renoises_the_estimate_on_the_grid() -> None:
    """With an oracle network (always the clean action) every input after the first is t*noise + (1-t)*action."""
    action, noise = _draws()
    seen: list[tuple[Tensor, Tensor]] = []

    def oracle(x_t: Tensor, t: Tensor) -> Tensor:
        seen.append((x_t, t))
        return action

    assert X0.grid(3) == [1.0, 2 / 3, 1 / 3]
    assert torch.equal(X0.sample(oracle, noise, 3), action)
    assert torch.equal(seen[0][0], noise)  # t = 1 on a zero estimate: pure noise
    for x_t, t in seen[1:]:
        assert t.shape == (3,)
        torch.testing.assert_close(x_t, t[0] * noise + (1 - t[0]) * action)


def test_velocity_sampler_follows_the_straight_path() -> None:
    """Euler with the exact velocity of the straight path to `action` lands on it, whatever the step count."""
    action, noise = _draws()
    assert VELOCITY.grid(4) == [0.0, 0.25, 0.5, 0.75]

    def exact(x_t: Tensor, t: Tensor) -> Tensor:
        return (action - x_t) / (1 - t.view(-1, 1, 1))

    for steps in (1, 3, 10):
        torch.testing.assert_close(VELOCITY.sample(exact, noise, steps), action, atol=1e-5, rtol=0)
    constant = VELOCITY.sample(lambda x_t, t: torch.ones_like(x_t), noise, 7)
    torch.testing.assert_close(constant, noise + 1)


def test_finish_post_processes_per_objective() -> None:
    state = torch.randn(2, 4, 20)
    ee6d, auto = build_action_space("ee6d"), build_action_space("auto", real_dim=7)
    assert torch.equal(X0.finish(state, ee6d), ee6d.postprocess(state))  # sigmoid on the gripper logits
    assert torch.equal(VELOCITY.finish(state, ee6d), state)  # velocity: no sigmoid
    assert torch.equal(VELOCITY.finish(state, auto), state[..., :7])


@pytest.mark.parametrize("name", ["x0_renoise", "velocity"])
def test_model_masks_gripper_inputs_as_the_objective_says(name: str) -> None:
    model = XVLA(small_config(objective=name))
    assert model.objective is OBJECTIVES[name]
    x_t = torch.ones(2, 30, 20)
    hidden = model.action_input(x_t)[..., [9, 19]]
    assert bool((hidden == 0).all()) if OBJECTIVES[name].masks_gripper_inputs else bool((hidden == 1).all())
    assert OBJECTIVES[name].masks_gripper_inputs == (name == "x0_renoise")


class _Negated(Velocity):
    """A new objective: velocity with its output negated."""

    name = "negated_velocity"

    def finish(self, state: Tensor, space: ActionSpace) -> Tensor:
        return -super().finish(state, space)


def test_a_registered_objective_drives_the_eager_and_fast_samplers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(OBJECTIVES, _Negated.name, _Negated())
    torch.manual_seed(0)
    plain = XVLA(small_config(objective="velocity")).eval()
    negated = XVLA(small_config(objective=_Negated.name)).eval()
    negated.load_state_dict(plain.state_dict())
    batch = make_batch(plain.config)
    batch.pop("action")
    noise = torch.randn(2, 30, 20)
    expected = -plain.generate(batch, steps=2, noise=noise)
    assert torch.equal(negated.generate(batch, steps=2, noise=noise), expected)
    torch.testing.assert_close(
        FastGenerator(negated)(batch, steps=2, noise=noise), expected, atol=1e-5, rtol=1e-4
    )
