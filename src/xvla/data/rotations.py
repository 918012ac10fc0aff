"""Rotation format conversions (numpy, float64 inside).

Every conversion goes through a rotation matrix ``[..., 3, 3]``. Supported formats (``format_dim`` gives the
vector size):

| name | dim | layout |
|---|---|---|
| ``quat_xyzw`` / ``quat_wxyz`` | 4 | unit quaternion, scalar last / first; output canonicalised to w >= 0 |
| ``axis_angle`` | 3 | rotation vector (axis * angle), angle in [0, pi] |
| ``matrix`` | 9 | row-major rotation matrix; re-orthonormalised (SVD) on the way in |
| ``rot6d_contiguous`` | 6 | first two columns ``[col0, col1]`` = ``[r00, r10, r20, r01, r11, r21]`` (LIBERO) |
| ``rot6d_interleaved`` | 6 | first two columns row-major ``[r00, r01, r10, r11, r20, r21]`` (Droid, RoboMind, ...) |
| ``euler_<abc>[_extrinsic|_intrinsic]`` | 3 | angles in radians, one per axis in the order written |

Euler: ``euler_xyz`` (same as ``euler_xyz_extrinsic``) rotates about the fixed x, then y, then z axes,
``R = Rz(c) @ Ry(b) @ Rx(a)`` (roll-pitch-yaw); ``euler_xyz_intrinsic`` rotates about the moving axes,
``R = Rx(a) @ Ry(b) @ Rz(c)``. Both Tait-Bryan (``xyz``) and proper (``zyz``) sequences are accepted.
rot6d is turned back into a matrix with Gram-Schmidt, so non-orthonormal network outputs are valid input.
"""

from __future__ import annotations

import re

import numpy as np

ROT6D_LAYOUTS = ("contiguous", "interleaved")
_FIXED_DIMS = {
    "quat_xyzw": 4,
    "quat_wxyz": 4,
    "axis_angle": 3,
    "matrix": 9,
    "rot6d_contiguous": 6,
    "rot6d_interleaved": 6,
}
_EULER = re.compile(r"^euler_([xyz])([xyz])([xyz])(?:_(extrinsic|intrinsic))?$")
_AXIS = {"x": 0, "y": 1, "z": 2}


def _euler_spec(fmt: str) -> tuple[tuple[int, int, int], bool] | None:
    """(axis indices, extrinsic) for an Euler format name, None for a non-Euler name."""
    m = _EULER.match(fmt)
    if m is None:
        return None
    axes = tuple(_AXIS[c] for c in m.group(1, 2, 3))
    if axes[0] == axes[1] or axes[1] == axes[2]:
        raise ValueError(f"rotation format {fmt!r}: consecutive Euler axes must differ (e.g. 'xyz', 'zyz')")
    return axes, m.group(4) != "intrinsic"  # type: ignore[return-value]


def format_dim(fmt: str) -> int:
    """Vector size of a rotation format; raises ValueError naming the accepted formats."""
    if fmt in _FIXED_DIMS:
        return _FIXED_DIMS[fmt]
    if _euler_spec(fmt) is not None:
        return 3
    raise ValueError(
        f"unknown rotation format {fmt!r}; expected one of {sorted(_FIXED_DIMS)} or "
        "'euler_<axes>[_extrinsic|_intrinsic]' such as 'euler_xyz' or 'euler_zyx_intrinsic'"
    )


def _check(x: np.ndarray, fmt: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    dim = format_dim(fmt)
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"rotation format {fmt!r} expects a last dimension of {dim}, got shape {x.shape}")
    return x


# ---------------------------------------------------------------- quaternions


def canonical_quat(q_xyzw: np.ndarray) -> np.ndarray:
    """Unit quaternion [..., 4] (xyzw) with a unique sign: the first of (w, x, y, z) that is not ~0 is > 0."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    order = q[..., [3, 0, 1, 2]]
    nonzero = np.abs(order) > 1e-12
    first = np.argmax(nonzero, axis=-1)
    lead = np.take_along_axis(order, first[..., None], axis=-1)
    return np.where(lead < 0, -q, q)


def quat_to_matrix(q_xyzw: np.ndarray) -> np.ndarray:
    """[..., 4] xyzw (normalised here) -> [..., 3, 3]."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(norm < 1e-8):
        raise ValueError("quaternion with (near) zero norm cannot be a rotation")
    x, y, z, w = np.moveaxis(q / norm, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def matrix_to_quat(rot: np.ndarray) -> np.ndarray:
    """[..., 3, 3] -> canonical unit quaternion [..., 4] xyzw (Shepperd's method: stable near 180 degrees)."""
    r = np.asarray(rot, dtype=np.float64)
    diag = np.stack([r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]], -1)
    trace = diag.sum(-1)
    # Candidates 4*q_i*q computed from the largest of (x^2, y^2, z^2, w^2) avoid dividing by a tiny number.
    cands = np.stack(
        [
            np.stack(
                [
                    1 + 2 * diag[..., 0] - trace,
                    r[..., 1, 0] + r[..., 0, 1],
                    r[..., 0, 2] + r[..., 2, 0],
                    r[..., 2, 1] - r[..., 1, 2],
                ],
                -1,
            ),
            np.stack(
                [
                    r[..., 1, 0] + r[..., 0, 1],
                    1 + 2 * diag[..., 1] - trace,
                    r[..., 2, 1] + r[..., 1, 2],
                    r[..., 0, 2] - r[..., 2, 0],
                ],
                -1,
            ),
            np.stack(
                [
                    r[..., 0, 2] + r[..., 2, 0],
                    r[..., 2, 1] + r[..., 1, 2],
                    1 + 2 * diag[..., 2] - trace,
                    r[..., 1, 0] - r[..., 0, 1],
                ],
                -1,
            ),
            np.stack(
                [
                    r[..., 2, 1] - r[..., 1, 2],
                    r[..., 0, 2] - r[..., 2, 0],
                    r[..., 1, 0] - r[..., 0, 1],
                    1 + trace,
                ],
                -1,
            ),
        ],
        -2,
    )
    best = np.argmax(np.concatenate([diag, trace[..., None]], -1), axis=-1)
    q = np.take_along_axis(cands, best[..., None, None], axis=-2)[..., 0, :]
    return canonical_quat(q)


def slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Spherical linear interpolation of xyzw quaternions [..., 4] along the shortest arc; t broadcast [...]."""
    q0 = np.asarray(q0, dtype=np.float64)
    q1 = np.asarray(q1, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)[..., None]
    dot = np.sum(q0 * q1, -1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)  # q and -q are the same rotation: take the short way round
    dot = np.clip(np.abs(dot), 0.0, 1.0)
    theta = np.arccos(dot)
    sin = np.sin(theta)
    small = sin < 1e-9
    safe = np.where(small, 1.0, sin)
    w0 = np.where(small, 1 - t, np.sin((1 - t) * theta) / safe)
    w1 = np.where(small, t, np.sin(t * theta) / safe)
    out = w0 * q0 + w1 * q1
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


# ---------------------------------------------------------------- axis-angle


def axis_angle_to_quat(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    angle = np.linalg.norm(v, axis=-1, keepdims=True)
    # sin(angle/2)/angle via np.sinc, exact at angle 0.
    scale = 0.5 * np.sinc(angle / (2 * np.pi))
    return np.concatenate([v * scale, np.cos(angle / 2)], -1)


def quat_to_axis_angle(q_xyzw: np.ndarray) -> np.ndarray:
    q = canonical_quat(q_xyzw)
    q = np.where(q[..., 3:] < 0, -q, q)  # w >= 0 keeps the angle in [0, pi] even when w is ~0
    vec, w = q[..., :3], q[..., 3:]
    s = np.linalg.norm(vec, axis=-1, keepdims=True)
    angle = 2 * np.arctan2(s, w)
    factor = np.where(s < 1e-12, 2.0 / np.maximum(w, 1e-12), angle / np.where(s < 1e-12, 1.0, s))
    return vec * factor


# ---------------------------------------------------------------- Euler


def _elementary(axis: int, angle: np.ndarray) -> np.ndarray:
    """Rotation about a coordinate axis: [...] -> [..., 3, 3]."""
    c, s = np.cos(angle), np.sin(angle)
    out = np.zeros(angle.shape + (3, 3))
    j, k = (axis + 1) % 3, (axis + 2) % 3
    out[..., axis, axis] = 1.0
    out[..., j, j] = c
    out[..., k, k] = c
    out[..., k, j] = s
    out[..., j, k] = -s
    return out


def _euler_to_matrix(angles: np.ndarray, axes: tuple[int, int, int], extrinsic: bool) -> np.ndarray:
    if not extrinsic:  # intrinsic (a, b, c) about (i, j, k) == extrinsic (c, b, a) about (k, j, i)
        axes, angles = axes[::-1], angles[..., ::-1]
    i, j, k = axes
    return _elementary(k, angles[..., 2]) @ _elementary(j, angles[..., 1]) @ _elementary(i, angles[..., 0])


def _matrix_to_euler(rot: np.ndarray, axes: tuple[int, int, int], extrinsic: bool) -> np.ndarray:
    """Solve R = R_k(c) R_j(b) R_i(a) (extrinsic order): b from column i, c as the angle about axis k that
    maps R_j(b) e_i onto R e_i, and a from the residual R_i(a), which stays exact at gimbal lock."""
    if not extrinsic:
        return _matrix_to_euler(rot, axes[::-1], True)[..., ::-1]
    i, j, k = axes
    col = rot[..., :, i]
    ei = np.eye(3)[i]
    if i == k:  # proper Euler: the i-component of column i is cos b
        other = 3 - i - j
        b = np.arctan2(np.hypot(col[..., j], col[..., other]), col[..., i])
    else:  # Tait-Bryan: the k-component of column i is sigma * sin b
        sigma = (_elementary(j, np.array(np.pi / 2)) @ ei)[k]
        b = np.arctan2(sigma * col[..., k], np.hypot(col[..., i], col[..., j]))
    u = _elementary(j, b) @ ei
    ek = np.eye(3)[k]
    u_perp = u - (u @ ek)[..., None] * ek
    v_perp = col - (col @ ek)[..., None] * ek
    c = np.arctan2(np.cross(u_perp, v_perp) @ ek, np.sum(u_perp * v_perp, -1))
    resid = np.swapaxes(_elementary(j, b), -1, -2) @ np.swapaxes(_elementary(k, c), -1, -2) @ rot
    jj, kk = (i + 1) % 3, (i + 2) % 3
    a = np.arctan2(resid[..., kk, jj], resid[..., jj, jj])
    return np.stack([a, b, c], -1)


# ---------------------------------------------------------------- rot6d and matrices


def gram_schmidt(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """Two 3-vectors [..., 3] (first two columns, possibly not orthonormal) -> rotation matrix [..., 3, 3]."""
    n1 = np.linalg.norm(a1, axis=-1, keepdims=True)
    if np.any(n1 < 1e-12):
        raise ValueError("rot6d with a zero first column cannot be turned into a rotation")
    b1 = a1 / n1
    a2 = a2 - np.sum(b1 * a2, -1, keepdims=True) * b1
    n2 = np.linalg.norm(a2, axis=-1, keepdims=True)
    if np.any(n2 < 1e-12):
        raise ValueError("rot6d with parallel (or zero) columns cannot be turned into a rotation")
    b2 = a2 / n2
    return np.stack([b1, b2, np.cross(b1, b2)], -1)


def _project_so3(m: np.ndarray) -> np.ndarray:
    """Nearest rotation to a 3x3 matrix (SVD, determinant forced to +1)."""
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    u = u.copy()
    u[..., :, 2] *= d[..., None]
    return u @ vt


# ---------------------------------------------------------------- public API


def to_matrix(x: np.ndarray, fmt: str) -> np.ndarray:
    """Rotation vectors [..., D] in ``fmt`` -> rotation matrices [..., 3, 3] (float64)."""
    x = _check(x, fmt)
    if fmt == "quat_xyzw":
        return quat_to_matrix(x)
    if fmt == "quat_wxyz":
        return quat_to_matrix(x[..., [1, 2, 3, 0]])
    if fmt == "axis_angle":
        return quat_to_matrix(axis_angle_to_quat(x))
    if fmt == "matrix":
        return _project_so3(x.reshape(x.shape[:-1] + (3, 3)))
    if fmt == "rot6d_contiguous":
        return gram_schmidt(x[..., 0:3], x[..., 3:6])
    if fmt == "rot6d_interleaved":
        return gram_schmidt(x[..., 0::2], x[..., 1::2])
    axes, extrinsic = _euler_spec(fmt)  # type: ignore[misc]  # format_dim validated the name
    return _euler_to_matrix(x, axes, extrinsic)


def from_matrix(rot: np.ndarray, fmt: str) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> vectors [..., D] in ``fmt`` (float64)."""
    format_dim(fmt)
    rot = np.asarray(rot, dtype=np.float64)
    if rot.shape[-2:] != (3, 3):
        raise ValueError(f"expected rotation matrices [..., 3, 3], got shape {rot.shape}")
    if fmt == "quat_xyzw":
        return matrix_to_quat(rot)
    if fmt == "quat_wxyz":
        return matrix_to_quat(rot)[..., [3, 0, 1, 2]]
    if fmt == "axis_angle":
        return quat_to_axis_angle(matrix_to_quat(rot))
    if fmt == "matrix":
        return rot.reshape(rot.shape[:-2] + (9,))
    if fmt == "rot6d_contiguous":
        return np.concatenate([rot[..., :, 0], rot[..., :, 1]], -1)
    if fmt == "rot6d_interleaved":
        return rot[..., :, :2].reshape(rot.shape[:-2] + (6,))
    axes, extrinsic = _euler_spec(fmt)  # type: ignore[misc]
    return _matrix_to_euler(rot, axes, extrinsic)


def convert(x: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert rotations [..., D_src] from format ``src`` to [..., D_dst] in format ``dst``."""
    return from_matrix(to_matrix(x, src), dst)


def rot6d_format(layout: str) -> str:
    """Rotation format name of a rot6d layout ("contiguous" | "interleaved")."""
    if layout not in ROT6D_LAYOUTS:
        raise ValueError(f"unknown rot6d layout {layout!r}; expected one of {ROT6D_LAYOUTS}")
    return f"rot6d_{layout}"
