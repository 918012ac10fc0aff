"""Flow objectives, registered by name (`XVLAConfig.objective`), and their sampler.

An objective holds everything that differs between flow formulations: the noisy input x_t, the training target
and its loss, which inputs the network must not see, the sampler's t-grid, start and step, and the output
post-processing. The eager model (`XVLA`) and the fast sampler (`xvla.model.fast.sampling`) both run through it,
so adding an objective is one class here and one entry in `OBJECTIVES`.

`x0_renoise` (the released checkpoints): x_t = t*noise + (1-t)*action (t=1 is pure noise), the network predicts the
clean action, and the sampler re-noises the current estimate with one fixed noise draw at t = 1, (N-1)/N, ..., 1/N.

`velocity` (an option for models trained from scratch): x_t = (1-t)*noise + t*action, the network predicts the
velocity action - noise (MSE), and the sampler integrates it with Euler steps from t=0 to t=1.

The sampler takes `denoise(x_t [B,T,A], t [B]) -> [B,T,A]` and contains no host syncs (no `.item()`, no branches
on tensor values), so the loop can be compiled or captured.

**Inpainting** (real-time chunking, `xvla.serve.execution`): with an `Inpainting` (actions a chunk must continue
and a weight per step), every network prediction is corrected before the sampler's next step so that its estimate
of the clean chunk becomes ``clean + w * (target - clean)``: `x0_renoise` blends the predicted x0 itself before it
is re-noised; `velocity` changes the velocity so that the Euler step's implied endpoint is the blended one. The
correction is applied after the last prediction too, so where w = 1 the output is exactly the target (up to the
gripper logit clamp of `ActionSpace.preimage`); w = 0 leaves a prediction bit-identical. This is the replacement
form of inpainting (not Black et al.'s gradient guidance, which needs a backward pass per step): one
multiply-add per step, no host syncs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from xvla.model.action_spaces import ActionSpace

Denoiser = Callable[[Tensor, Tensor], Tensor]

T_MAX = 1.0 - 1e-5  # stratified t wraps below 1


def stratified_t(u: Tensor, batch_size: int) -> Tensor:
    """One u ~ U[0,1) [1] -> t_b = (u + b/B) mod (1 - 1e-5), [B]."""
    offsets = torch.arange(batch_size, device=u.device, dtype=u.dtype) / batch_size
    return (u + offsets) % T_MAX


@dataclass(frozen=True)
class Inpainting:
    """Actions a sampled chunk must continue: `actions` [B, T, input_dim] in the space `generate` returns
    (post-processed), `weight` [B, T] in [0, 1] (1: the output equals `actions` at that step; 0: unconstrained)."""

    actions: Tensor
    weight: Tensor

    def check(self, batch: int, steps: int, input_dim: int) -> None:
        """Raise ValueError unless the shapes match a [batch, steps, input_dim] chunk and values are usable."""
        if tuple(self.actions.shape) != (batch, steps, input_dim):
            raise ValueError(
                f"inpainting actions: expected shape {(batch, steps, input_dim)}, got {tuple(self.actions.shape)}"
            )
        if tuple(self.weight.shape) != (batch, steps):
            raise ValueError(
                f"inpainting weight: expected shape {(batch, steps)}, got {tuple(self.weight.shape)}"
            )
        if not bool(torch.isfinite(self.actions).all()):
            raise ValueError("inpainting actions: contain NaN or infinite values")
        if not bool(((self.weight >= 0) & (self.weight <= 1)).all()):
            raise ValueError("inpainting weight: expected values in [0, 1]")


Guide = tuple[Tensor, Tensor]  # (target [B, T, A] in the sampler's space, weight [B, T, 1])


class FlowObjective(ABC):
    """One flow formulation; stateless (one shared instance per name in `OBJECTIVES`).

    `t` in `net_input` is a [B, 1, 1] tensor in the eager sampler and a host float in the fast one: each path
    keeps its own arithmetic, the formula is written once.
    """

    name: ClassVar[str]
    # Zero x_t's gripper channels (where the action space hides them) before the network.
    masks_gripper_inputs: ClassVar[bool]

    @abstractmethod
    def noisy(self, action: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t [B, T, A] for action, noise [B, T, A] and t [B]."""

    @abstractmethod
    def target(self, action: Tensor, noise: Tensor) -> Tensor:
        """What the network regresses, [B, T, A]."""

    @abstractmethod
    def loss_terms(self, pred: Tensor, target: Tensor, space: ActionSpace) -> dict[str, Tensor]:
        """Weighted loss terms per sample, each [B]; pred, target [B, T, A]."""

    @abstractmethod
    def grid(self, steps: int) -> list[float]:
        """The sampler's t values as host floats (nothing to copy to the device inside the loop)."""

    @abstractmethod
    def start(self, noise: Tensor) -> Tensor:
        """The sampler's state before the first step, [B, T, A]."""

    @abstractmethod
    def net_input(self, state: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """x_t [B, T, A] the network reads at grid point t (before any gripper masking)."""

    @abstractmethod
    def step(self, state: Tensor, pred: Tensor, steps: int) -> Tensor:
        """The state after a network call that returned pred [B, T, A]."""

    @abstractmethod
    def finish(self, state: Tensor, space: ActionSpace) -> Tensor:
        """Final state [B, T, dim] -> action chunk [B, T, input_dim]."""

    @abstractmethod
    def unfinish(self, actions: Tensor, space: ActionSpace) -> Tensor:
        """Inverse of `finish`: an action chunk [B, T, input_dim] -> the sampler's state space [B, T, dim]."""

    @abstractmethod
    def guide(self, state: Tensor, pred: Tensor, t: Tensor | float, guide: Guide) -> Tensor:
        """The prediction [B, T, A] corrected so that its clean-chunk estimate moves to the guide's target by the
        guide's weight (module doc, "Inpainting"); `t` as in `net_input`."""

    def guidance(self, inpaint: Inpainting, space: ActionSpace, dtype: torch.dtype) -> Guide:
        """An `Inpainting` (post-processed actions) -> the sampler's (target [B, T, A], weight [B, T, 1])."""
        target = self.unfinish(inpaint.actions.to(dtype), space)
        return target, inpaint.weight.to(dtype)[..., None]

    def sample(self, denoise: Denoiser, noise: Tensor, steps: int, guide: Guide | None = None) -> Tensor:
        """Raw sampler output [B, T, A] (not finished) from noise [B, T, A] in `steps` network calls; `guide`
        inpaints (module doc)."""
        b = noise.shape[0]
        state = self.start(noise)
        for tk in self.grid(steps):
            t = torch.full((b,), tk, device=noise.device, dtype=noise.dtype)
            tt = t.view(-1, 1, 1)
            pred = denoise(self.net_input(state, noise, tt), t)
            if guide is not None:
                pred = self.guide(state, pred, tt, guide)
            state = self.step(state, pred, steps)
        return state


class X0Renoise(FlowObjective):
    """The released objective: predict the clean action, re-noise it at the next t; gripper targets are logits."""

    name = "x0_renoise"
    masks_gripper_inputs = True

    def noisy(self, action: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        tt = t.view(-1, 1, 1).to(action.dtype)
        return tt * noise + (1 - tt) * action

    def target(self, action: Tensor, noise: Tensor) -> Tensor:
        return action

    def loss_terms(self, pred: Tensor, target: Tensor, space: ActionSpace) -> dict[str, Tensor]:
        return space.loss_terms(pred, target)

    def grid(self, steps: int) -> list[float]:
        return [i / steps for i in range(steps, 0, -1)]

    def start(self, noise: Tensor) -> Tensor:
        return torch.zeros_like(noise)  # a_hat = 0

    def net_input(self, state: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        return t * noise + (1 - t) * state

    def step(self, state: Tensor, pred: Tensor, steps: int) -> Tensor:
        return pred

    def finish(self, state: Tensor, space: ActionSpace) -> Tensor:
        return space.postprocess(state)

    def unfinish(self, actions: Tensor, space: ActionSpace) -> Tensor:
        return space.preimage(actions)

    def guide(self, state: Tensor, pred: Tensor, t: Tensor | float, guide: Guide) -> Tensor:
        target, weight = guide
        return pred + weight * (target - pred)  # pred is the clean estimate: blend it before re-noising


class Velocity(FlowObjective):
    """Rectified flow: predict action - noise, Euler from t=0 (noise) to t=1 (action). The network needs the noise
    on every channel, so no x_t input is masked, and the output is used as is (no sigmoid)."""

    name = "velocity"
    masks_gripper_inputs = False

    def noisy(self, action: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        tt = t.view(-1, 1, 1).to(action.dtype)
        return (1 - tt) * noise + tt * action

    def target(self, action: Tensor, noise: Tensor) -> Tensor:
        return action - noise

    def loss_terms(self, pred: Tensor, target: Tensor, space: ActionSpace) -> dict[str, Tensor]:
        return {"velocity_loss": (pred - target).square().flatten(1).mean(1)}

    def grid(self, steps: int) -> list[float]:
        dt = 1.0 / steps
        return [i * dt for i in range(steps)]

    def start(self, noise: Tensor) -> Tensor:
        return noise

    def net_input(self, state: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        return state

    def step(self, state: Tensor, pred: Tensor, steps: int) -> Tensor:
        return state + (1.0 / steps) * pred

    def finish(self, state: Tensor, space: ActionSpace) -> Tensor:
        return state[..., : space.input_dim]

    def unfinish(self, actions: Tensor, space: ActionSpace) -> Tensor:
        return space.pad(actions)

    def guide(self, state: Tensor, pred: Tensor, t: Tensor | float, guide: Guide) -> Tensor:
        target, weight = guide
        # The Euler endpoint from t is state + (1 - t) * pred; grid t < 1, so 1 - t >= 1/steps.
        clean = state + (1 - t) * pred
        return pred + weight * (target - clean) / (1 - t)


OBJECTIVES: dict[str, FlowObjective] = {o.name: o for o in (X0Renoise(), Velocity())}


def get_objective(name: str) -> FlowObjective:
    """The objective registered as `name` (the serialised `XVLAConfig.objective`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known objectives: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
