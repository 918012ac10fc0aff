"""Rotation conversions: round trips between every pair of formats (hypothesis), exact known values, scipy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from xvla.data import rotations

FORMATS = [
    "quat_xyzw",
    "quat_wxyz",
    "axis_angle",
    "matrix",
    "rot6d_contiguous",
    "rot6d_interleaved",
    "euler_xyz",
    "euler_zyx_intrinsic",
    "euler_zyz",
    "euler_yxy_intrinsic",
]
EULER_SEQS = ["".join(p) for p in itertools.product("xyz", repeat=3) if p[0] != p[1] and p[1] != p[2]]

unit = st.floats(-1.0, 1.0, allow_nan=False)


@st.composite
def rotation_matrices(draw: st.DrawFn) -> np.ndarray:
    """Random rotations, half of them within 1e-6 rad of a half turn (or exactly a half turn)."""
    axis = np.array([draw(unit), draw(unit), draw(unit)])
    if np.linalg.norm(axis) < 1e-3:
        axis = np.array([0.0, 0.0, 1.0])
    axis /= np.linalg.norm(axis)
    if draw(st.booleans()):
        angle = np.pi - draw(st.sampled_from([0.0, 1e-12, 1e-9, 1e-6]))
    else:
        angle = draw(st.floats(0.0, np.pi))
    return rotations.to_matrix(axis * angle, "axis_angle")


HALF_TURNS = [
    np.pi * np.array(axis) / np.linalg.norm(axis) for axis in ([1, 0, 0], [0, 1, 0], [1, 1, 1], [1, -2, 0.5])
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rotation_matrices())
@example(rotations.to_matrix(HALF_TURNS[0], "axis_angle"))
@example(rotations.to_matrix(HALF_TURNS[1], "axis_angle"))
@example(rotations.to_matrix(HALF_TURNS[2], "axis_angle"))
@example(rotations.to_matrix(HALF_TURNS[3], "axis_angle"))
@example(np.eye(3))
def test_round_trip_between_all_formats(rot: np.ndarray) -> None:
    for src, dst in itertools.product(FORMATS, FORMATS):
        x = rotations.from_matrix(rot, src)
        assert x.shape == (rotations.format_dim(src),)
        y = rotations.convert(x, src, dst)
        np.testing.assert_allclose(rotations.to_matrix(y, dst), rot, atol=1e-9, err_msg=f"{src} -> {dst}")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rotation_matrices())
def test_outputs_are_proper_rotations_and_quaternions_canonical(rot: np.ndarray) -> None:
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    q = rotations.from_matrix(rot, "quat_xyzw")
    assert np.linalg.norm(q) == pytest.approx(1.0)
    lead = next(v for v in q[[3, 0, 1, 2]] if abs(v) > 1e-12)
    assert lead > 0
    # q and -q are one rotation: both come back as the same canonical quaternion
    np.testing.assert_allclose(rotations.convert(-q, "quat_xyzw", "quat_xyzw"), q, atol=1e-12)
    assert np.linalg.norm(rotations.from_matrix(rot, "axis_angle")) <= np.pi + 1e-12


def test_known_values_and_layouts() -> None:
    quarter_z = rotations.to_matrix(np.array([0.0, 0.0, np.pi / 2]), "euler_xyz")
    np.testing.assert_allclose(quarter_z @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    np.testing.assert_allclose(
        rotations.from_matrix(quarter_z, "quat_wxyz"), [np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)]
    )
    np.testing.assert_allclose(rotations.from_matrix(quarter_z, "axis_angle"), [0, 0, np.pi / 2])
    # roll-pitch-yaw: extrinsic xyz == intrinsic zyx with the angles reversed
    rpy = np.array([0.3, -0.7, 1.1])
    np.testing.assert_allclose(
        rotations.to_matrix(rpy, "euler_xyz"),
        rotations.to_matrix(rpy[::-1], "euler_zyx_intrinsic"),
        atol=1e-15,
    )
    r = np.arange(9.0).reshape(3, 3)  # layouts only pick entries: any matrix shows them
    np.testing.assert_array_equal(rotations.from_matrix(r, "rot6d_contiguous"), [0, 3, 6, 1, 4, 7])
    np.testing.assert_array_equal(rotations.from_matrix(r, "rot6d_interleaved"), [0, 1, 3, 4, 6, 7])
    np.testing.assert_array_equal(rotations.from_matrix(r, "matrix"), np.arange(9.0))


def test_rot6d_gram_schmidt_accepts_non_orthonormal_input() -> None:
    rng = np.random.default_rng(0)
    rot = rotations.to_matrix(rng.normal(size=(64, 3)), "axis_angle")
    for layout in rotations.ROT6D_LAYOUTS:
        fmt = rotations.rot6d_format(layout)
        noisy = rotations.from_matrix(rot, fmt) * 1.7 + rng.normal(scale=1e-3, size=(64, 6))
        back = rotations.to_matrix(noisy, fmt)
        np.testing.assert_allclose(
            back @ np.swapaxes(back, 1, 2), np.broadcast_to(np.eye(3), (64, 3, 3)), atol=1e-12
        )
        assert np.abs(back - rot).max() < 1e-2
        # the first column's direction is kept exactly
        col0 = noisy[:, :3] if layout == "contiguous" else noisy[:, 0::2]
        np.testing.assert_allclose(
            back[:, :, 0], col0 / np.linalg.norm(col0, axis=1, keepdims=True), atol=1e-12
        )


def test_matches_scipy() -> None:
    transform = pytest.importorskip("scipy.spatial.transform")
    ref = transform.Rotation.random(100, random_state=3)
    mats = ref.as_matrix()
    np.testing.assert_allclose(rotations.to_matrix(ref.as_quat(), "quat_xyzw"), mats, atol=1e-12)
    np.testing.assert_allclose(rotations.to_matrix(ref.as_rotvec(), "axis_angle"), mats, atol=1e-12)
    np.testing.assert_allclose(rotations.from_matrix(mats, "axis_angle"), ref.as_rotvec(), atol=1e-9)
    for seq in EULER_SEQS:
        for extrinsic in (True, False):
            fmt = f"euler_{seq}" + ("" if extrinsic else "_intrinsic")
            angles = ref.as_euler(seq if extrinsic else seq.upper())
            np.testing.assert_allclose(rotations.to_matrix(angles, fmt), mats, atol=1e-12, err_msg=fmt)
            mine = rotations.from_matrix(mats, fmt)
            wrapped = np.angle(np.exp(1j * (mine - angles)))  # equal up to 2*pi
            np.testing.assert_allclose(wrapped, 0.0, atol=1e-9, err_msg=fmt)


def test_euler_gimbal_lock_round_trips() -> None:
    for fmt, middle in [
        ("euler_xyz", np.pi / 2),
        ("euler_zyx_intrinsic", -np.pi / 2),
        ("euler_zyz", 0.0),
        ("euler_zyz", np.pi),
    ]:
        rot = rotations.to_matrix(np.array([0.4, middle, -1.2]), fmt)
        np.testing.assert_allclose(rotations.to_matrix(rotations.from_matrix(rot, fmt), fmt), rot, atol=1e-12)


def test_slerp_constant_rate_and_shortest_arc() -> None:
    q0 = rotations.from_matrix(np.eye(3), "quat_xyzw")
    q1 = rotations.convert(np.array([0.0, 0.0, 2.0]), "axis_angle", "quat_xyzw")
    for t in (0.0, 0.25, 0.5, 1.0):
        mid = rotations.slerp(q0, -q1, t)  # -q1 is the same rotation: the short way is still 2 rad
        np.testing.assert_allclose(
            rotations.convert(mid, "quat_xyzw", "axis_angle"), [0, 0, 2.0 * t], atol=1e-12
        )


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("quat", "unknown rotation format 'quat'"),
        ("euler_xxy", "consecutive Euler axes"),
        ("euler_xyz_sideways", "unknown"),
    ],
)
def test_bad_formats_are_named(fmt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rotations.format_dim(fmt)


def test_bad_shapes_and_degenerate_values_raise() -> None:
    with pytest.raises(ValueError, match="expects a last dimension of 4"):
        rotations.to_matrix(np.zeros(3), "quat_xyzw")
    with pytest.raises(ValueError, match="zero norm"):
        rotations.to_matrix(np.zeros(4), "quat_xyzw")
    with pytest.raises(ValueError, match="rot6d"):
        rotations.to_matrix(np.zeros(6), "rot6d_contiguous")
