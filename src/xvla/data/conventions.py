"""Pose and gripper conventions of one arm: native values <-> metres, rotation matrices and [0, 1] grippers.

A `PoseConvention` says how a native position + rotation is written (units, rotation format, absolute or
delta, frame name); a `GripperConvention` says which native value is open, which is closed and whether the
signal is binary. The canonical side is always: position in metres, rotation matrix, gripper in [0, 1] with
closed = 1.

Deltas: a delta pose is applied to a reference pose ``(p_ref, R_ref)``. With ``delta_rotation="world"``
(the common case: LIBERO, Bridge) ``p = p_ref + dp`` and ``R = dR @ R_ref``; with ``"local"`` (tool frame)
``p = p_ref + R_ref @ dp`` and ``R = R_ref @ dR``. Grippers are always absolute commands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xvla.data import rotations

UNIT_SCALE = {"m": 1.0, "cm": 0.01, "mm": 0.001}  # native unit -> metres
POSE_MODES = ("absolute", "delta")
DELTA_ROTATIONS = ("world", "local")


@dataclass(frozen=True)
class PoseConvention:
    """How one arm's position and orientation are written in a native vector."""

    position_unit: str = "m"  # "m" | "cm" | "mm"
    rotation: str = "quat_xyzw"  # any name accepted by rotations.format_dim
    mode: str = "absolute"  # "absolute" | "delta" (each row relative to the pose it is applied to)
    frame: str = "base"  # name of the reference frame; poses of one arm must agree across streams
    delta_rotation: str = "world"  # "world" | "local": how a delta composes with its reference (module doc)

    def problems(self) -> list[str]:
        """Human-readable ``field: expectation`` strings; empty when valid."""
        out = []
        if self.position_unit not in UNIT_SCALE:
            out.append(f"position_unit: expected one of {sorted(UNIT_SCALE)}, got {self.position_unit!r}")
        try:
            rotations.format_dim(self.rotation)
        except ValueError as err:
            out.append(f"rotation: {err}")
        if self.mode not in POSE_MODES:
            out.append(f"mode: expected one of {POSE_MODES}, got {self.mode!r}")
        if self.delta_rotation not in DELTA_ROTATIONS:
            out.append(f"delta_rotation: expected one of {DELTA_ROTATIONS}, got {self.delta_rotation!r}")
        if not isinstance(self.frame, str) or not self.frame:
            out.append(f"frame: expected a non-empty name, got {self.frame!r}")
        return out

    @property
    def rotation_dim(self) -> int:
        return rotations.format_dim(self.rotation)

    def decode(self, position: np.ndarray, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Native [N, 3] position and [N, D] rotation -> metres [N, 3] and matrices [N, 3, 3] (as written:
        absolute or delta)."""
        pos = np.asarray(position, dtype=np.float64) * UNIT_SCALE[self.position_unit]
        return pos, rotations.to_matrix(rotation, self.rotation)

    def encode(self, position_m: np.ndarray, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `decode`: metres [N, 3] and matrices [N, 3, 3] -> native [N, 3] and [N, D]."""
        pos = np.asarray(position_m, dtype=np.float64) / UNIT_SCALE[self.position_unit]
        return pos, rotations.from_matrix(rot, self.rotation)

    def compose(
        self, ref_pos: np.ndarray, ref_rot: np.ndarray, d_pos: np.ndarray, d_rot: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply deltas (metres [N, 3], matrices [N, 3, 3]) to reference poses -> absolute poses."""
        if self.delta_rotation == "world":
            return ref_pos + d_pos, d_rot @ ref_rot
        return ref_pos + np.einsum("nij,nj->ni", ref_rot, d_pos), ref_rot @ d_rot

    def relative(
        self, ref_pos: np.ndarray, ref_rot: np.ndarray, pos: np.ndarray, rot: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `compose`: the deltas that take reference poses to absolute poses."""
        ref_rot_t = np.swapaxes(ref_rot, -1, -2)
        if self.delta_rotation == "world":
            return pos - ref_pos, rot @ ref_rot_t
        return np.einsum("nij,nj->ni", ref_rot_t, pos - ref_pos), ref_rot_t @ rot


def chain_to_deltas(
    convention: PoseConvention, start_pos: np.ndarray, start_rot: np.ndarray, pos: np.ndarray, rot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Absolute poses [T, 3], [T, 3, 3] reached one after the other from a start pose [3], [3, 3] -> the
    step-to-step deltas [T, 3], [T, 3, 3] (delta k goes from pose k-1 to pose k; pose -1 is the start)."""
    prev_pos = np.concatenate([start_pos[None], pos[:-1]], 0)
    prev_rot = np.concatenate([start_rot[None], rot[:-1]], 0)
    return convention.relative(prev_pos, prev_rot, pos, rot)


def chain_from_deltas(
    convention: PoseConvention,
    start_pos: np.ndarray,
    start_rot: np.ndarray,
    d_pos: np.ndarray,
    d_rot: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `chain_to_deltas`: integrate step-to-step deltas [T, ...] from a start pose."""
    pos, rot = [], []
    cur_pos, cur_rot = start_pos[None], start_rot[None]
    for k in range(len(d_pos)):
        cur_pos, cur_rot = convention.compose(cur_pos, cur_rot, d_pos[k : k + 1], d_rot[k : k + 1])
        pos.append(cur_pos[0])
        rot.append(cur_rot[0])
    return np.stack(pos).reshape(-1, 3), np.stack(rot).reshape(-1, 3, 3)


@dataclass(frozen=True)
class GripperConvention:
    """Native gripper signal: the value meaning open, the value meaning closed, binary or continuous."""

    open: float = 0.0
    closed: float = 1.0
    binary: bool = False  # a binary gripper is thresholded and never interpolated
    # A binary gripper's command is "closed" when the model's closed-probability reaches this (recorded data are
    # read at the midpoint). Below 0.5 the robot commits to a grasp the policy is unsure of (docs/demo.md, item 30).
    close_at: float = 0.5

    def problems(self) -> list[str]:
        out = []
        for name in ("open", "closed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                out.append(f"{name}: expected a finite number, got {value!r}")
        if not out and self.open == self.closed:
            out.append(f"open/closed: expected two different values, got {self.open} for both")
        if not isinstance(self.binary, bool):
            out.append(f"binary: expected true or false, got {self.binary!r}")
        if (
            isinstance(self.close_at, bool)
            or not isinstance(self.close_at, (int, float))
            or not 0 < self.close_at < 1
        ):
            out.append(f"close_at: expected a number strictly between 0 and 1, got {self.close_at!r}")
        return out

    def to_canonical(self, value: np.ndarray) -> np.ndarray:
        """Native [N] -> [N] in [0, 1], closed = 1 (binary: exactly 0 or 1)."""
        g = (np.asarray(value, dtype=np.float64) - self.open) / (self.closed - self.open)
        g = np.clip(g, 0.0, 1.0)
        return (g >= 0.5).astype(np.float64) if self.binary else g

    def to_native(self, value: np.ndarray) -> np.ndarray:
        """[N] in [0, 1] (closed = 1; values outside are clipped) -> native [N] (binary: closed from `close_at`)."""
        g = np.clip(np.asarray(value, dtype=np.float64), 0.0, 1.0)
        if self.binary:
            g = (g >= self.close_at).astype(np.float64)
        return self.open + g * (self.closed - self.open)
