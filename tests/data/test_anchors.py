"""Intention abstraction on analytic trajectories: exact anchors, end clipping, gripper holds, static frames."""

from __future__ import annotations

import numpy as np
import pytest

from xvla.data import anchors, rotations

FPS = 10.0


def _canonical(pos: np.ndarray, rot: np.ndarray, grip: np.ndarray, layout: str = "contiguous") -> np.ndarray:
    """[N, 3], [N, 3, 3], [N] -> single-arm canonical [N, 20]."""
    out = np.zeros((len(pos), 20))
    out[:, :3] = pos
    out[:, 3:9] = rotations.from_matrix(rot, rotations.rot6d_format(layout))
    out[:, 9] = grip
    return out


def _targets(
    times: np.ndarray,
    traj: np.ndarray,
    t: float,
    horizon: float,
    binary: bool = False,
    layout: str = "contiguous",
) -> np.ndarray:
    return anchors.intention_targets(
        times, traj, t, horizon, num_arms=1, rot6d_layout=layout, binary_grippers=[binary]
    )


def test_anchor_times_clip_at_the_end() -> None:
    np.testing.assert_allclose(anchors.anchor_times(1.0, 10.0, 3.0), np.linspace(1.0, 4.0, 31))
    np.testing.assert_allclose(anchors.anchor_times(8.0, 10.0, 3.0), np.linspace(8.0, 10.0, 31))
    np.testing.assert_allclose(anchors.anchor_times(10.0, 10.0, 3.0), np.full(31, 10.0))


def test_linear_motion_gives_exact_anchors_between_samples() -> None:
    times = np.arange(50) / FPS
    velocity = np.array([0.1, -0.05, 0.02])
    traj = _canonical(times[:, None] * velocity, np.broadcast_to(np.eye(3), (50, 3, 3)), times / times[-1])
    t, horizon = 1.3, 1.0  # 30 targets 1/30 s apart: most fall between the 10 Hz samples
    got = _targets(times, traj, t, horizon)
    query = np.linspace(t, t + horizon, 31)[1:]
    assert got.shape == (30, 20)
    np.testing.assert_allclose(got[:, :3], query[:, None] * velocity, atol=1e-12)
    np.testing.assert_allclose(got[:, 9], query / times[-1], atol=1e-12)  # continuous gripper: linear
    np.testing.assert_allclose(got[:, 3:9], traj[:30, 3:9], atol=1e-12)
    np.testing.assert_array_equal(got[:, 10:], 0.0)


def test_circle_sampled_at_the_anchor_times_is_exact_and_clipped_at_the_end() -> None:
    times = np.arange(40) / FPS  # t_end = 3.9
    angle = 2 * np.pi * times / 4.0
    pos = np.stack([0.5 + 0.1 * np.cos(angle), 0.1 * np.sin(angle), np.full_like(angle, 0.3)], 1)
    traj = _canonical(pos, np.broadcast_to(np.eye(3), (40, 3, 3)), np.zeros(40))
    got = _targets(times, traj, 0.0, 3.0)  # anchors every 0.1 s land on the samples 1..30
    np.testing.assert_allclose(got[:, :3], pos[1:31], atol=1e-12)
    clipped = _targets(times, traj, 3.0, 3.0)  # window [3.0, 3.9] instead of [3.0, 6.0]
    query = np.linspace(3.0, 3.9, 31)[1:]
    np.testing.assert_allclose(clipped[-1, :3], pos[-1], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(clipped[:, :2] - [0.5, 0.0], axis=1)[9::10], 0.1, atol=1e-12)
    np.testing.assert_allclose(
        np.arctan2(clipped[9::10, 1], clipped[9::10, 0] - 0.5),
        np.angle(np.exp(2j * np.pi * query[9::10] / 4.0)),
        atol=1e-12,
    )


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_constant_rate_rotation_is_interpolated_exactly(layout: str) -> None:
    times = np.arange(30) / FPS
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    rate = 2.5  # rad/s: 0.25 rad between samples
    rot = rotations.to_matrix(times[:, None] * rate * axis, "axis_angle")
    traj = _canonical(np.zeros((30, 3)), rot, np.zeros(30), layout)
    t = 0.45
    got = _targets(times, traj, t, 2.0, layout=layout)
    query = np.linspace(t, t + 2.0, 31)[1:]
    expected = rotations.to_matrix(query[:, None] * rate * axis, "axis_angle")
    np.testing.assert_allclose(
        rotations.to_matrix(got[:, 3:9], rotations.rot6d_format(layout)), expected, atol=1e-12
    )


def test_binary_gripper_is_held_not_smeared() -> None:
    times = np.arange(20) / FPS
    grip = (times >= 1.0).astype(float)  # closes at t = 1.0
    traj = _canonical(times[:, None] * [0.1, 0, 0], np.broadcast_to(np.eye(3), (20, 3, 3)), grip)
    query = np.linspace(0.5, 1.5, 31)[1:]
    held = _targets(times, traj, 0.5, 1.0, binary=True)
    assert set(np.unique(held[:, 9])) == {0.0, 1.0}
    np.testing.assert_array_equal(held[:, 9], (query >= 1.0 - 1e-12).astype(float))
    smeared = _targets(times, traj, 0.5, 1.0, binary=False)
    assert ((smeared[:, 9] > 0) & (smeared[:, 9] < 1)).any()  # a continuous gripper is interpolated


def test_two_arms_are_interpolated_independently() -> None:
    times = np.arange(10) / FPS
    traj = np.zeros((10, 20))
    traj[:, :10] = _canonical(
        times[:, None] * [1.0, 0, 0], np.broadcast_to(np.eye(3), (10, 3, 3)), np.zeros(10)
    )[:, :10]
    right = rotations.to_matrix(times[:, None] * [0, 0, 1.0], "axis_angle")
    traj[:, 10:] = _canonical(np.ones((10, 3)), right, np.ones(10))[:, :10]
    got = anchors.intention_targets(
        times, traj, 0.0, 0.6, num_arms=2, rot6d_layout="contiguous", binary_grippers=[False, True]
    )
    query = np.linspace(0.0, 0.6, 31)[1:]
    np.testing.assert_allclose(got[:, 0], query, atol=1e-12)
    np.testing.assert_allclose(got[:, 10:13], 1.0)
    np.testing.assert_allclose(
        rotations.to_matrix(got[:, 13:19], "rot6d_contiguous"),
        rotations.to_matrix(query[:, None] * [0, 0, 1.0], "axis_angle"),
        atol=1e-12,
    )


def test_valid_frames_skip_static_windows() -> None:
    times = np.arange(60) / FPS
    x = np.concatenate([np.zeros(20), np.linspace(0, 0.2, 20), np.full(20, 0.2)])  # still, move, still
    traj = _canonical(
        np.stack([x, np.zeros(60), np.zeros(60)], 1), np.broadcast_to(np.eye(3), (60, 3, 3)), np.zeros(60)
    )
    valid = anchors.valid_frames(times, traj, times, traj, horizon_s=0.55)
    # frames whose window reaches the motion (frame 21 is the first to move) up to the last moving frame (39)
    np.testing.assert_array_equal(valid, np.arange(16, 39))
    traj[50, 9] = 1.0  # a gripper change alone makes a window non-static
    assert 50 in anchors.valid_frames(times, traj, times, traj, horizon_s=0.55)
    traj[50, 9] = 1e-6  # below the 1e-5 threshold
    assert 50 not in anchors.valid_frames(times, traj, times, traj, horizon_s=0.55)


def test_bad_timestamps_raise() -> None:
    traj = np.zeros((3, 20))
    with pytest.raises(ValueError, match="strictly increasing"):
        anchors.valid_frames(np.array([0.0, 0.1, 0.1]), traj, np.arange(3.0), traj, 1.0)
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        anchors.valid_frames(np.arange(3.0), traj, np.arange(4.0), traj, 1.0)


def test_resample_chunk_to_the_control_rate() -> None:
    # a chunk predicted for 1.5 s from a proprio at x = 0 moving at 0.2 m/s, replayed at 20 Hz
    grid = np.linspace(0.0, 1.5, 31)
    traj = _canonical(
        grid[:, None] * [0.2, 0.0, 0.0], np.broadcast_to(np.eye(3), (31, 3, 3)), (grid > 0.7).astype(float)
    )
    out = anchors.resample_chunk(
        traj[0], traj[1:], 1.5, 20.0, num_arms=1, rot6d_layout="contiguous", binary_grippers=[True]
    )
    steps = np.arange(1, 31) / 20.0
    assert out.shape == (30, 20)
    np.testing.assert_allclose(out[:, 0], 0.2 * steps, atol=1e-12)
    np.testing.assert_allclose(out[:, 3:9], traj[1:, 3:9], atol=1e-12)
    np.testing.assert_array_equal(
        out[:, 9], (steps > 0.75 - 1e-9).astype(float)
    )  # held from the anchor at 0.75 s
