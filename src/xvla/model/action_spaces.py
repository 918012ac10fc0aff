"""Action spaces: layout, loss terms and pre/post-processing, registered by name.

Adding a space is one registered class:

    @register_action_space("my_space")
    class MySpace(ActionSpace):
        dim = 7
        def loss_terms(self, pred, target): ...

Loss terms are returned per sample (`[B]`), each the mean over the sample's steps and dims times its weight, so
`terms.mean(0)` equals the authors' batch-mean formulas exactly in value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

_REGISTRY: dict[str, type[ActionSpace]] = {}
GRIPPER_EPS = 1e-4  # `preimage`: a 0/1 gripper becomes a logit of about -+9.2


def register_action_space(name: str) -> Callable[[type[ActionSpace]], type[ActionSpace]]:
    def wrap(cls: type[ActionSpace]) -> type[ActionSpace]:
        if name in _REGISTRY:
            raise ValueError(f"action space {name!r} is already registered")
        cls.name = name
        cls.layout = cls.__dict__.get("layout") or name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_action_spaces() -> list[str]:
    return sorted(_REGISTRY)


def build_action_space(name: str, real_dim: int = 20, max_dim: int = 20) -> ActionSpace:
    """The action space registered as `name` (`real_dim`/`max_dim` only matter for `auto`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown action space {name!r}; known action spaces: {available_action_spaces()}")
    cls = _REGISTRY[name]
    return cls(real_dim=real_dim, max_dim=max_dim) if cls is AutoActionSpace else cls()


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    """[B, T, K] -> [B]: mean squared error per sample."""
    return (pred - target).square().flatten(1).mean(1)


def _bce(logits: Tensor, target: Tensor) -> Tensor:
    """[B, T, K] -> [B]: BCE-with-logits per sample."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)


class ActionSpace:
    """Base class. `dim` is the width the network reads and writes; `gripper_idx` channels are 0/1 targets."""

    name: ClassVar[str] = ""
    # The data layout a source must provide (`Source.action_space`); spaces that differ only in losses and
    # masking share one (agibot_ee6d reads ee6d data). Defaults to the space's own name.
    layout: ClassVar[str] = ""
    dim: ClassVar[int]
    gripper_idx: ClassVar[tuple[int, ...]] = ()
    zero_gripper_inputs: ClassVar[bool] = False  # zero gripper channels of x_t and proprio before the net
    gripper_logits: ClassVar[bool] = False  # network emits logits on gripper channels (sigmoid on output)

    @property
    def input_dim(self) -> int:
        """Width of actions accepted from data (`auto` accepts its real width and pads)."""
        return self.dim

    def pad(self, x: Tensor) -> Tensor:
        """Bring `[..., input_dim]` data to `[..., dim]` (identity except for `auto`)."""
        return x

    def mask_gripper(self, x: Tensor) -> Tensor:
        """x [..., D] with its gripper channels zeroed when this space hides them from the network."""
        idx = [i for i in self.gripper_idx if i < x.shape[-1]]
        if not (self.zero_gripper_inputs and idx):
            return x
        keep = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        keep[idx] = 0
        return x * keep

    def preprocess(self, proprio: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """What the network sees: proprio [B, P] and x_t [B, T, A] with gripper inputs zeroed if needed."""
        return self.mask_gripper(proprio), self.mask_gripper(x_t)

    def postprocess(self, pred: Tensor) -> Tensor:
        """Network output [B, T, dim] -> actions [B, T, input_dim] (sigmoid on gripper logits)."""
        if not (self.gripper_logits and self.gripper_idx):
            return pred
        is_grip = torch.zeros(pred.shape[-1], dtype=torch.bool, device=pred.device)
        is_grip[list(self.gripper_idx)] = True
        return torch.where(is_grip, torch.sigmoid(pred), pred)

    def preimage(self, actions: Tensor) -> Tensor:
        """Inverse of `postprocess`: actions [B, T, input_dim] -> network outputs [B, T, dim] (padded; gripper
        values in [0, 1] to logits, clamped to +-logit(1 - GRIPPER_EPS) so a binary 0/1 stays finite)."""
        x = self.pad(actions)
        if not (self.gripper_logits and self.gripper_idx):
            return x
        is_grip = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        is_grip[list(self.gripper_idx)] = True
        return torch.where(is_grip, torch.logit(x.clamp(GRIPPER_EPS, 1 - GRIPPER_EPS)), x)

    def loss_terms(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Weighted loss terms per sample, each `[B]`. pred/target: [B, T, dim]."""
        raise NotImplementedError


def _dims(pred: Tensor, idx: tuple[int, ...] | list[int]) -> Tensor:
    return pred[..., list(idx)]


@register_action_space("ee6d")
class EE6DActionSpace(ActionSpace):
    """Two arms of xyz(3) + rot6d(6) + gripper(1): left 0..9, right 10..19."""

    dim = 20
    gripper_idx = (9, 19)
    zero_gripper_inputs = True
    gripper_logits = True
    xyz_idx: ClassVar[tuple[tuple[int, ...], ...]] = ((0, 1, 2), (10, 11, 12))
    rot_idx: ClassVar[tuple[tuple[int, ...], ...]] = (tuple(range(3, 9)), tuple(range(13, 19)))
    xyz_weight: ClassVar[float] = 500.0
    rot_weight: ClassVar[float] = 10.0
    gripper_weight: ClassVar[float] = 1.0

    def gripper_term(self, pred: Tensor, target: Tensor) -> Tensor:
        return _bce(_dims(pred, self.gripper_idx), _dims(target, self.gripper_idx))

    def loss_terms(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        # sum() starts from int 0; with at least one index group (every arm has one) the result is a Tensor.
        pos = cast(Tensor, sum(_mse(_dims(pred, i), _dims(target, i)) for i in self.xyz_idx))
        rot = cast(Tensor, sum(_mse(_dims(pred, i), _dims(target, i)) for i in self.rot_idx))
        return {
            "position_loss": pos * self.xyz_weight,
            "rotate6D_loss": rot * self.rot_weight,
            "gripper_loss": self.gripper_term(pred, target) * self.gripper_weight,
        }


@register_action_space("agibot_ee6d")
class AgibotEE6DActionSpace(EE6DActionSpace):
    """ee6d layout, all MSE (gripper x10), nothing zeroed, no sigmoid."""

    layout = "ee6d"
    zero_gripper_inputs = False
    gripper_logits = False
    gripper_weight = 10.0

    def gripper_term(self, pred: Tensor, target: Tensor) -> Tensor:
        return _mse(_dims(pred, self.gripper_idx), _dims(target, self.gripper_idx))


@register_action_space("joint")
class JointActionSpace(ActionSpace):
    """Two arms of 6 joints + gripper: grippers at 6 and 13."""

    dim = 14
    gripper_idx = (6, 13)
    zero_gripper_inputs = True
    gripper_logits = True
    joints_weight: ClassVar[float] = 1.0
    gripper_weight: ClassVar[float] = 0.1

    def loss_terms(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        joints = [i for i in range(self.dim) if i not in self.gripper_idx]
        return {
            "joints_loss": _mse(_dims(pred, joints), _dims(target, joints)) * self.joints_weight,
            "gripper_loss": _bce(_dims(pred, self.gripper_idx), _dims(target, self.gripper_idx))
            * self.gripper_weight,
        }


@register_action_space("auto")
class AutoActionSpace(ActionSpace):
    """Any `real_dim` <= `max_dim` layout: zero-padded to `max_dim`, trimmed on output, 100 * MSE on the real dims."""

    dim = 20
    weight: ClassVar[float] = 100.0

    def __init__(self, real_dim: int = 20, max_dim: int = 20) -> None:
        if not 1 <= real_dim <= max_dim:
            raise ValueError(
                f"auto action space: expected 1 <= real_action_dim <= max_action_dim, got {real_dim} > {max_dim}"
            )
        self.real_dim = real_dim
        self.dim = max_dim  # type: ignore[misc]

    @property
    def input_dim(self) -> int:
        return self.real_dim

    def pad(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, self.dim - x.shape[-1])) if x.shape[-1] < self.dim else x

    def postprocess(self, pred: Tensor) -> Tensor:
        return pred[..., : self.real_dim]

    def loss_terms(self, pred: Tensor, target: Tensor) -> dict[str, Tensor]:
        r = self.real_dim
        return {"joints_loss": _mse(pred[..., :r], target[..., :r]) * self.weight}  # the authors' term name
