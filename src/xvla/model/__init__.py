"""xvla.model: the X-VLA network (Florence-2 encoder + soft-prompted transformer), flow objectives, checkpoints."""

from xvla.model.action_spaces import (
    ActionSpace,
    available_action_spaces,
    build_action_space,
    register_action_space,
)
from xvla.model.florence import EncodedObservation
from xvla.model.xvla import XVLA, LossOutput

__all__ = [
    "XVLA",
    "ActionSpace",
    "EncodedObservation",
    "LossOutput",
    "available_action_spaces",
    "build_action_space",
    "register_action_space",
]
