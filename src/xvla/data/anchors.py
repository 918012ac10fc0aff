"""Intention abstraction: a frame's proprio plus 30 action targets spread over the query horizon.

For a frame at time ``t`` the absolute canonical trajectory is interpolated at
``linspace(t, min(t + horizon, t_end), 31)``: point 0 is the proprio, points 1..30 are the targets.
Interpolation per arm: positions linearly; rotations by slerp between the two bracketing samples (rot6d ->
matrix -> quaternion, shortest arc, back to rot6d), which moves at a constant angular rate between samples;
grippers linearly when continuous, and as a previous-sample hold when binary, so an open/close switch is never
smeared into intermediate values. Queries outside the sampled times hold the first/last sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xvla.data import rotations

NUM_POINTS = 31  # proprio + 30 targets
STATIC_THRESHOLD = 1e-5
ARM_DIM = 10


def anchor_times(t: float, t_end: float, horizon_s: float, num_points: int = NUM_POINTS) -> np.ndarray:
    """[num_points] query times from ``t`` to ``min(t + horizon_s, t_end)`` (point 0 is ``t``)."""
    return np.linspace(t, max(t, min(t + horizon_s, t_end)), num_points)


def _check_times(times: np.ndarray, n: int) -> np.ndarray:
    times = np.asarray(times, dtype=np.float64)
    if times.shape != (n,):
        raise ValueError(f"timestamps: expected shape ({n},) matching the trajectory, got {times.shape}")
    if n > 1 and np.any(np.diff(times) <= 0):
        bad = int(np.argmax(np.diff(times) <= 0))
        raise ValueError(
            f"timestamps: expected strictly increasing values, frame {bad + 1} is at {times[bad + 1]}"
            f" after {times[bad]}"
        )
    return times


def interpolate(
    times: np.ndarray,
    traj: np.ndarray,
    query: np.ndarray,
    *,
    num_arms: int,
    rot6d_layout: str,
    binary_grippers: Sequence[bool],
) -> np.ndarray:
    """Canonical ee6d trajectory [N, P] sampled at ``times`` [N] -> values at ``query`` [K] -> [K, P].

    Arms beyond ``num_arms`` (zero padding) stay zero."""
    traj = np.asarray(traj, dtype=np.float64)
    times = _check_times(times, len(traj))
    query = np.asarray(query, dtype=np.float64)
    out = np.zeros((len(query), traj.shape[1]))
    if len(traj) == 1:
        out[:] = traj[0]
        return out
    # Segment [i, i+1] that brackets each query and the fraction along it (clamped at both ends).
    i = np.clip(np.searchsorted(times, query, side="right") - 1, 0, len(times) - 2)
    alpha = np.clip((query - times[i]) / (times[i + 1] - times[i]), 0.0, 1.0)
    prev = np.where(alpha >= 1.0, i + 1, i)  # the latest sample at or before the query
    fmt = rotations.rot6d_format(rot6d_layout)
    for arm in range(num_arms):
        b = arm * ARM_DIM
        p = traj[:, b : b + 3]
        out[:, b : b + 3] = p[i] + alpha[:, None] * (p[i + 1] - p[i])
        quat = rotations.matrix_to_quat(rotations.to_matrix(traj[:, b + 3 : b + 9], fmt))
        rot = rotations.quat_to_matrix(rotations.slerp(quat[i], quat[i + 1], alpha))
        out[:, b + 3 : b + 9] = rotations.from_matrix(rot, fmt)
        g = traj[:, b + 9]
        out[:, b + 9] = g[prev] if binary_grippers[arm] else g[i] + alpha * (g[i + 1] - g[i])
    return out


def intention_targets(
    times: np.ndarray,
    traj: np.ndarray,
    t: float,
    horizon_s: float,
    *,
    num_arms: int,
    rot6d_layout: str,
    binary_grippers: Sequence[bool],
    num_points: int = NUM_POINTS,
) -> np.ndarray:
    """The ``num_points - 1`` targets [30, P] after time ``t``; ``t_end`` is the last trajectory time."""
    query = anchor_times(t, float(np.asarray(times)[-1]), horizon_s, num_points)
    return interpolate(
        times, traj, query[1:], num_arms=num_arms, rot6d_layout=rot6d_layout, binary_grippers=binary_grippers
    )


def resample_chunk(
    proprio: np.ndarray,
    chunk: np.ndarray,
    horizon_s: float,
    rate_hz: float,
    *,
    num_arms: int,
    rot6d_layout: str,
    binary_grippers: Sequence[bool],
) -> np.ndarray:
    """A predicted chunk [T, P] (targets at ``linspace(0, horizon_s, T + 1)[1:]`` after now, starting from
    ``proprio`` [P]) -> the poses at the control rate, ``k / rate_hz`` for k = 1..round(horizon_s * rate_hz):
    [K, P]. Same interpolation as training, so serving reads the anchors the way they were made."""
    chunk = np.asarray(chunk, dtype=np.float64)
    times = np.linspace(0.0, horizon_s, len(chunk) + 1)
    traj = np.concatenate([np.asarray(proprio, dtype=np.float64)[None], chunk], 0)
    steps = max(1, round(horizon_s * rate_hz))
    query = np.arange(1, steps + 1) / rate_hz
    return interpolate(
        times, traj, query, num_arms=num_arms, rot6d_layout=rot6d_layout, binary_grippers=binary_grippers
    )


def valid_frames(
    frame_times: np.ndarray,
    proprio: np.ndarray,
    target_times: np.ndarray,
    targets: np.ndarray,
    horizon_s: float,
    threshold: float = STATIC_THRESHOLD,
) -> np.ndarray:
    """Indices [M'] of the frames worth training on: frame i (at ``frame_times`` [M], value ``proprio`` [M, P])
    is static, and skipped, when every sample of ``targets`` [N, P] (at ``target_times`` [N]) inside its window
    ``[t_i, t_i + horizon_s]`` is within ``threshold`` of ``proprio[i]`` (max abs over dims). With the state
    stream as targets pass the same arrays twice."""
    proprio = np.asarray(proprio, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    frame_times = _check_times(frame_times, len(proprio))
    target_times = _check_times(target_times, len(targets))
    eps = 1e-9  # timestamps that are sums of float periods are equal only up to rounding
    starts = np.searchsorted(target_times, frame_times - eps, side="left")
    ends = np.searchsorted(target_times, frame_times + horizon_s + eps, side="right")
    keep = [
        i
        for i in range(len(proprio))
        if np.max(np.abs(targets[starts[i] : ends[i]] - proprio[i]), initial=0.0) > threshold
    ]
    return np.asarray(keep, dtype=np.int64)
