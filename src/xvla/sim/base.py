"""The simulated-source interface: one environment per (robot, camera setup, control interface).

A `SimSource` exposes what a real robot would (images by camera, native proprio, an instruction) plus two
privileged extras for data generation and checks: `success()` and a scripted `expert(obs)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SimSpec:
    """Static description of a simulated source (JSON-serialisable).

    Attributes:
        name: source name, also the dataset folder name and the domain name in the mixture.
        robot: robot model (e.g. "Panda"); `robot_type` of the LeRobot dataset.
        simulator: "metaworld" | "robosuite" | "so100".
        fps: control (and recording) rate in Hz.
        tasks: task id -> language instruction.
        max_steps: task id -> step limit of an episode (expert and evaluation).
        cameras: camera names, primary first (dataset keys `observation.images.<camera>`).
        flipped_cameras: cameras whose native image is upside down (rotate by 180 degrees to view).
        state_names: names of the native `observation.state` entries.
        action_names: names of the native `action` entries.
        horizon_s: query horizon of the 30 action anchors in seconds.
        held_out: True for the adaptation robot never used in pre-training.
        render_revision: bumped whenever the source's images change (cameras, lighting), so that datasets
            generated before are rebuilt rather than mixed with new evaluation images.
        expert_revision: bumped whenever the scripted expert's demonstrations change, for the same reason.
    """

    name: str
    robot: str
    simulator: str
    fps: float
    tasks: dict[str, str]
    max_steps: dict[str, int]
    cameras: tuple[str, ...]
    state_names: tuple[str, ...]
    action_names: tuple[str, ...]
    horizon_s: float = 1.0
    flipped_cameras: tuple[str, ...] = ()
    held_out: bool = False
    render_revision: int = 0
    expert_revision: int = 0
    notes: str = ""

    def __post_init__(self) -> None:
        if set(self.tasks) != set(self.max_steps):
            raise ValueError(f"source {self.name!r}: tasks and max_steps must name the same tasks")
        if len(self.cameras) < 2:
            raise ValueError(f"source {self.name!r}: needs >= 2 cameras, got {self.cameras}")

    def check_task(self, task: str | None) -> str:
        """The task id to use (`None` -> the first); raises naming the valid ones."""
        if task is None:
            return next(iter(self.tasks))
        if task not in self.tasks:
            raise ValueError(
                f"source {self.name!r} has no task {task!r}; expected one of {sorted(self.tasks)}"
            )
        return task


@dataclass
class Observation:
    """What a policy sees: images by camera ([H, W, 3] uint8 RGB, native orientation), native state [S]."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    instruction: str
    task: str
    privileged: dict[str, np.ndarray] = field(default_factory=dict)


class SimSource(ABC):
    """A simulated robot. Lifecycle: `reset(seed, task)`, then `observe()` / `step(action)` until done."""

    spec: SimSpec

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.task: str = ""
        self.steps = 0

    @abstractmethod
    def reset(self, seed: int, task: str | None = None) -> Observation:
        """Start an episode of `task` whose initial state is a pure function of `seed`."""

    @abstractmethod
    def observe(self, render: bool = True) -> Observation:
        """Current observation; `render=False` skips the images (cheap, for experts and replays)."""

    @abstractmethod
    def step(self, action: np.ndarray) -> None:
        """Execute one native action [A] for one control period (1 / fps seconds)."""

    @abstractmethod
    def success(self) -> bool:
        """Whether the task is solved in the current state."""

    @abstractmethod
    def expert(self, obs: Observation) -> np.ndarray:
        """Native action [A] of the scripted privileged-state expert for the current step."""

    def milestones(self) -> dict[str, bool]:
        """Which sub-goals of the current task hold in the current state (privileged), in task order, success
        excluded: e.g. ``{"reach": True, "grasp": False}``. Evaluation records which ones an episode ever
        reached, so a failure says where it stopped. Empty where a source defines none."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release renderers and simulator resources."""

    @property
    def max_steps(self) -> int:
        return self.spec.max_steps[self.task]

    def instruction(self) -> str:
        return self.spec.tasks[self.task]
