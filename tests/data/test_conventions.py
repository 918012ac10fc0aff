"""Pose and gripper conventions: units, deltas (world and tool frame), gripper normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from xvla.data import rotations
from xvla.data.conventions import GripperConvention, PoseConvention, chain_from_deltas, chain_to_deltas


def _poses(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rotations.to_matrix(rng.normal(size=(n, 3)), "axis_angle")


def test_units_and_rotation_format_decode_encode() -> None:
    conv = PoseConvention(position_unit="mm", rotation="euler_xyz")
    pos, rot = conv.decode(np.array([[1000.0, -20.0, 5.0]]), np.array([[0.0, 0.0, np.pi / 2]]))
    np.testing.assert_allclose(pos, [[1.0, -0.02, 0.005]])
    np.testing.assert_allclose(rot[0] @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    back_pos, back_rot = conv.encode(pos, rot)
    np.testing.assert_allclose(back_pos, [[1000.0, -20.0, 5.0]])
    np.testing.assert_allclose(back_rot, [[0.0, 0.0, np.pi / 2]], atol=1e-15)


@pytest.mark.parametrize("frame", ["world", "local"])
def test_delta_compose_and_relative_are_inverse(frame: str) -> None:
    conv = PoseConvention(mode="delta", delta_rotation=frame)
    ref_pos, ref_rot = _poses(16, 0)
    pos, rot = _poses(16, 1)
    d_pos, d_rot = conv.relative(ref_pos, ref_rot, pos, rot)
    got_pos, got_rot = conv.compose(ref_pos, ref_rot, d_pos, d_rot)
    np.testing.assert_allclose(got_pos, pos, atol=1e-12)
    np.testing.assert_allclose(got_rot, rot, atol=1e-12)


def test_delta_frames_differ_as_documented() -> None:
    ref_rot = rotations.to_matrix(np.array([0.0, 0.0, np.pi / 2]), "axis_angle")[None]  # tool x = world y
    d_pos = np.array([[0.1, 0.0, 0.0]])
    d_rot = rotations.to_matrix(np.array([0.2, 0.0, 0.0]), "axis_angle")[None]
    world = PoseConvention(mode="delta", delta_rotation="world")
    local = PoseConvention(mode="delta", delta_rotation="local")
    p_w, r_w = world.compose(np.zeros((1, 3)), ref_rot, d_pos, d_rot)
    p_l, r_l = local.compose(np.zeros((1, 3)), ref_rot, d_pos, d_rot)
    np.testing.assert_allclose(p_w, [[0.1, 0, 0]], atol=1e-15)
    np.testing.assert_allclose(p_l, [[0, 0.1, 0]], atol=1e-15)
    np.testing.assert_allclose(r_w, d_rot @ ref_rot)
    np.testing.assert_allclose(r_l, ref_rot @ d_rot)


@pytest.mark.parametrize("frame", ["world", "local"])
def test_delta_chain_reconstructs_absolute_trajectory(frame: str) -> None:
    conv = PoseConvention(mode="delta", delta_rotation=frame)
    start_pos, start_rot = _poses(1, 2)
    pos, rot = _poses(12, 3)
    d_pos, d_rot = chain_to_deltas(conv, start_pos[0], start_rot[0], pos, rot)
    # the first delta goes from the start pose, the others from the previous target
    np.testing.assert_allclose(
        conv.compose(start_pos, start_rot, d_pos[:1], d_rot[:1])[0], pos[:1], atol=1e-12
    )
    got_pos, got_rot = chain_from_deltas(conv, start_pos[0], start_rot[0], d_pos, d_rot)
    np.testing.assert_allclose(got_pos, pos, atol=1e-10)
    np.testing.assert_allclose(got_rot, rot, atol=1e-10)


def test_gripper_normalisation() -> None:
    # a parallel gripper reporting its opening width: 0.08 m open, 0 closed
    width = GripperConvention(open=0.08, closed=0.0)
    np.testing.assert_allclose(width.to_canonical(np.array([0.08, 0.04, 0.0, -0.01])), [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(width.to_native(np.array([0.0, 0.5, 1.0])), [0.08, 0.04, 0.0])
    binary = GripperConvention(open=-1.0, closed=1.0, binary=True)
    np.testing.assert_array_equal(binary.to_canonical(np.array([-1.0, -0.1, 0.2, 1.0])), [0, 0, 1, 1])
    np.testing.assert_array_equal(binary.to_native(np.array([0.1, 0.49, 0.51, 0.9])), [-1, -1, 1, 1])
    # a lower close_at commits to the grasp earlier; recorded data are still read at the midpoint
    eager = GripperConvention(open=-1.0, closed=1.0, binary=True, close_at=0.1)
    np.testing.assert_array_equal(eager.to_native(np.array([0.05, 0.1, 0.3, 0.9])), [-1, 1, 1, 1])
    np.testing.assert_array_equal(eager.to_canonical(np.array([-1.0, -0.1, 0.2, 1.0])), [0, 0, 1, 1])


def test_problems_name_the_field() -> None:
    assert PoseConvention().problems() == []
    problems = PoseConvention(
        position_unit="inch", rotation="quat", mode="relative", delta_rotation="tool"
    ).problems()
    assert [p.split(":")[0] for p in problems] == ["position_unit", "rotation", "mode", "delta_rotation"]
    assert GripperConvention(open=1.0, closed=1.0).problems() == [
        "open/closed: expected two different values, got 1.0 for both"
    ]
    assert GripperConvention(open=float("nan")).problems()[0].startswith("open: expected a finite number")
    for bad in (0.0, 1.0, True, "0.2"):
        assert GripperConvention(close_at=bad).problems() == [  # type: ignore[arg-type]
            f"close_at: expected a number strictly between 0 and 1, got {bad!r}"
        ]
