"""Fast headless MuJoCo rendering shared by every simulated source.

No multisampling, no shadows, no reflections: ~10 ms per frame on llvmpipe instead of ~100 ms, nearly
independent of the image size (the GL backend is chosen in `xvla/sim/__init__.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mujoco
import numpy as np


@dataclass(frozen=True)
class CameraPose:
    """A camera placed at run time: position [3] (m), unit quaternion [4] (w, x, y, z, MuJoCo order), fovy (deg)."""

    pos: tuple[float, float, float]
    quat: tuple[float, float, float, float]
    fovy: float


def look_at_quat(pos: Sequence[float], target: Sequence[float], up: Sequence[float] = (0, 0, 1)) -> tuple:
    """MuJoCo camera quaternion (w, x, y, z) looking from `pos` at `target` (cameras look along their -z)."""
    pos_a, target_a, up_a = (np.asarray(v, dtype=np.float64) for v in (pos, target, up))
    back = pos_a - target_a
    back /= np.linalg.norm(back)
    right = np.cross(up_a, back)
    right /= np.linalg.norm(right)
    cam_up = np.cross(back, right)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.stack([right, cam_up, back], axis=1).reshape(-1))
    return tuple(float(q) for q in quat)


def place_camera(model: mujoco.MjModel, name: str, pose: CameraPose) -> None:
    """Move an existing camera of `model` (fixed mode) to `pose`."""
    cam = model.camera(name)
    model.cam_pos[cam.id] = pose.pos
    model.cam_quat[cam.id] = pose.quat
    model.cam_fovy[cam.id] = pose.fovy


class FastRenderer:
    """One offscreen renderer per model, rendering named cameras at one square size.

    Args:
        model: the MuJoCo model (its `vis.quality.offsamples` is set to 0, which must precede the GL context).
        size: image height and width in pixels.
        hide_groups: geom groups not drawn (robosuite draws collision geoms in group 0).
    """

    def __init__(self, model: mujoco.MjModel, size: int, hide_groups: Sequence[int] = ()) -> None:
        if size <= 0:
            raise ValueError(f"image size must be positive, got {size}")
        model.vis.quality.offsamples = 0
        # The offscreen buffer must hold the image; small models ship a 640x480 default, enough for <= 480 px.
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        self.size = size
        self._renderer = mujoco.Renderer(model, height=size, width=size)
        self._option = mujoco.MjvOption()
        for group in hide_groups:
            self._option.geomgroup[group] = 0

    def render(self, data: mujoco.MjData, camera: str, flip: bool = False) -> np.ndarray:
        """RGB image [size, size, 3] uint8 of `camera`; `flip` rotates it by 180 degrees (upside-down mounts)."""
        self._renderer.update_scene(data, camera=camera, scene_option=self._option)
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1, ::-1]) if flip else image.copy()

    def close(self) -> None:
        self._renderer.close()
