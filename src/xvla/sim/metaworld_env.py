"""Meta-World Sawyer: 80 Hz mocap control with delta-xyz actions (1 unit = 1 cm per step, clipped to +-1).

Native action [7]: delta position in cm, delta rotation (axis-angle, rad; Meta-World holds the hand
orientation fixed, so it is recorded as 0 and ignored when executed), gripper effort (-1 open, +1 close).
Native state [8]: the commanded hand pose -- the mocap body position (m, world) and quaternion (w, x, y, z)
that the arm is servoed to -- and the gripper effort in effect. The measured hand trails the mocap target by
1-2 cm when moving fast; deltas integrate on the mocap, so with the commanded pose as state a chunk of
absolute targets converts to deltas exactly. Experts are the scripted policies shipped with Meta-World.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xvla.sim import render
from xvla.sim.base import Observation, SimSource, SimSpec

# task id -> (instruction, step limit, expert policy class name in metaworld.policies)
_TASKS: dict[str, tuple[str, int, str]] = {
    "pick-place": ("pick up the puck and place it at the green goal", 200, "SawyerPickPlaceV3Policy"),
    "push": ("push the puck to the green goal", 200, "SawyerPushV3Policy"),
    "drawer-open": ("open the drawer", 200, "SawyerDrawerOpenV3Policy"),
    "button-press-topdown": ("press the button from the top", 200, "SawyerButtonPressTopdownV3Policy"),
    "door-open": ("open the door", 250, "SawyerDoorOpenV3Policy"),
}
# Tasks whose goal is a free point in space: at 64 px the stock goal dot is invisible, so it is enlarged.
_SHOW_GOAL = ("pick-place", "push")

SAWYER = SimSpec(
    name="mw_sawyer",
    robot="Sawyer",
    simulator="metaworld",
    fps=80.0,
    tasks={task: spec[0] for task, spec in _TASKS.items()},
    max_steps={task: spec[1] for task, spec in _TASKS.items()},
    cameras=("corner", "gripperPOV"),
    flipped_cameras=("corner",),
    state_names=("x", "y", "z", "qw", "qx", "qy", "qz", "gripper_effort"),
    action_names=("dx_cm", "dy_cm", "dz_cm", "drx", "dry", "drz", "gripper_effort"),
    horizon_s=1.0,
    notes="mocap delta-xyz control, 1 unit = 1 cm per step; gripper effort -1 open, +1 close",
)


class MetaWorldSource(SimSource):
    """Meta-World v3 goal-observable environments, object and goal randomised per seed."""

    spec = SAWYER

    def __init__(self, image_size: int = 64) -> None:
        super().__init__(image_size)
        self._envs: dict[str, Any] = {}
        self._renderers: dict[str, render.FastRenderer] = {}
        self._obs = np.zeros(39)
        self._info: dict[str, Any] = {}
        self._policy: Any = None
        self._effort = -1.0

    def _env(self, task: str) -> Any:
        if task not in self._envs:
            from metaworld import policies
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

            # typed as SawyerXYZEnv classes; the goal-observable ones are built at import and take a seed
            make: Any = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-v3-goal-observable"]
            env = make(seed=0)
            # Unfreeze the random vector so every reset draws object and goal positions from env.np_random.
            env._freeze_rand_vec = False
            env.seeded_rand_vec = True
            if task in _SHOW_GOAL:
                goal = env.model.site("goal").id
                env.model.site_size[goal][0] = 0.03
                env.model.site_rgba[goal] = (0.1, 0.9, 0.1, 1.0)
            self._envs[task] = env
            self._renderers[task] = render.FastRenderer(env.model, self.image_size)
            env._xvla_policy = getattr(policies, _TASKS[task][2])()
        return self._envs[task]

    def reset(self, seed: int, task: str | None = None) -> Observation:
        self.task = self.spec.check_task(task)
        env = self._env(self.task)
        env.seed(int(seed))
        self._obs, _ = env.reset()
        self._info = {"success": False}
        self._policy = env._xvla_policy
        self._effort = -1.0
        self.steps = 0
        return self.observe()

    def observe(self, render: bool = True) -> Observation:
        env = self._envs[self.task]
        images = {}
        if render:
            renderer = self._renderers[self.task]
            images = {cam: renderer.render(env.data, cam) for cam in self.spec.cameras}
        quat = env.data.mocap_quat[0]  # Meta-World writes the unnormalised (1, 0, 1, 0)
        return Observation(
            images=images,
            state=np.concatenate([env.data.mocap_pos[0], quat / np.linalg.norm(quat), [self._effort]]).astype(
                np.float32
            ),
            instruction=self.instruction(),
            task=self.task,
            privileged={"obs": self._obs.copy()},
        )

    def step(self, action: np.ndarray) -> None:
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(7), -1.0, 1.0)
        native = np.concatenate([action[:3], action[6:]])  # the rotation delta has no effect here
        self._obs, _, _, _, self._info = self._envs[self.task].step(native)
        self._effort = float(action[6])
        self.steps += 1

    def success(self) -> bool:
        return bool(self._info.get("success", False))

    def milestones(self) -> dict[str, bool]:
        """reach: Meta-World's own `near_object` (the gripper at the button or handle)."""
        return {"reach": bool(self._info.get("near_object", False))}

    def expert(self, obs: Observation) -> np.ndarray:
        move = np.clip(self._policy.get_action(obs.privileged["obs"]), -1.0, 1.0)
        return np.concatenate([move[:3], np.zeros(3), move[3:]]).astype(np.float32)

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()
        self._envs.clear()
