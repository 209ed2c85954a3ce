"""Rigid-transform helpers shared by every stage, so one convention holds everywhere.

Convention: `T_a_b` is a 4x4 homogeneous matrix that maps points expressed in frame b into
frame a (p_a = T_a_b @ p_b). Quaternions are (x, y, z, w), the ROS message order.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def make_transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = rotation
    T[:3, 3] = translation
    return T


def invert(T: np.ndarray) -> np.ndarray:
    """Closed-form inverse; np.linalg.inv drifts from SE(3) on long chains."""
    R, t = T[:3, :3], T[:3, 3]
    return make_transform(R.T, -R.T @ t)


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply T to the first three columns of `points`, keeping any extra columns (intensity...)."""
    out = np.array(points, dtype=points.dtype, copy=True)
    out[:, :3] = points[:, :3] @ T[:3, :3].T.astype(points.dtype) + T[:3, 3].astype(points.dtype)
    return out


def _hat(w: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    W = np.zeros(w.shape[:-1] + (3, 3))
    W[..., 0, 1], W[..., 0, 2], W[..., 1, 2] = -w[..., 2], w[..., 1], -w[..., 0]
    return W - np.swapaxes(W, -1, -2)


def se3_log(T: np.ndarray) -> np.ndarray:
    """(6,) twist (rotation vector, then translation part) with se3_exp(twist) == T."""
    w = Rotation.from_matrix(T[:3, :3]).as_rotvec()
    theta = np.linalg.norm(w)
    c = 1 / 12 + theta**2 / 720 if theta < 1e-4 else 1 / theta**2 - (1 + np.cos(theta)) / (2 * theta * np.sin(theta))
    W = _hat(w)
    return np.concatenate([w, (np.eye(3) - 0.5 * W + c * W @ W) @ T[:3, 3]])


def se3_exp(twists: np.ndarray) -> np.ndarray:
    """(K, 6) twists -> (K, 4, 4) transforms, closed form (scipy's expm is ~100x slower on 4x4 matrices)."""
    w, v = twists[:, :3], twists[:, 3:]
    theta = np.linalg.norm(w, axis=1)[:, None, None]
    small = theta < 1e-4
    safe = np.where(small, 1.0, theta)
    a = np.where(small, 0.5 - theta**2 / 24, (1 - np.cos(safe)) / safe**2)
    b = np.where(small, 1 / 6 - theta**2 / 120, (safe - np.sin(safe)) / safe**3)
    W = _hat(w)
    V = np.eye(3) + a * W + b * W @ W
    T = np.tile(np.eye(4), (len(twists), 1, 1))
    T[:, :3, :3] = Rotation.from_rotvec(w).as_matrix()
    T[:, :3, 3] = np.einsum("kij,kj->ki", V, v)
    return T


def xyyaw_to_matrix(x: float, y: float, yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return make_transform(np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]), np.array([x, y, 0.0]))


def matrix_to_xyyaw(T: np.ndarray) -> tuple[float, float, float]:
    return float(T[0, 3]), float(T[1, 3]), float(np.arctan2(T[1, 0], T[0, 0]))


def quat_xyzw_to_matrix(quat_xyzw: np.ndarray, translation: np.ndarray) -> np.ndarray:
    return make_transform(Rotation.from_quat(quat_xyzw).as_matrix(), translation)


def matrix_to_quat_xyzw(T: np.ndarray) -> np.ndarray:
    """(4) or (N, 4) quaternions of one (4, 4) transform or a stack (N, 4, 4)."""
    return Rotation.from_matrix(T[..., :3, :3]).as_quat()


def rotation_error_deg(T_est: np.ndarray, T_true: np.ndarray) -> float:
    """Geodesic angle between the two rotations (the RRE of the registration literature)."""
    R = T_est[:3, :3].T @ T_true[:3, :3]
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def translation_error(T_est: np.ndarray, T_true: np.ndarray) -> float:
    """Euclidean distance between the translations (the RTE of the registration literature)."""
    return float(np.linalg.norm(T_est[:3, 3] - T_true[:3, 3]))


def random_rotation(rng: np.random.Generator, max_angle_deg: float = 180.0, axis: np.ndarray | None = None) -> np.ndarray:
    """A uniformly drawn rotation angle about a random (or the given) axis."""
    if axis is None:
        axis = rng.normal(size=3)
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-max_angle_deg, max_angle_deg))
    return Rotation.from_rotvec(axis * angle).as_matrix()


def load_kitti_poses(path: str) -> np.ndarray:
    """KITTI pose.txt (12 numbers per line, row-major 3x4) as an (N, 4, 4) array."""
    rows = np.loadtxt(path, dtype=float, ndmin=2)
    if rows.shape[1] != 12:
        raise ValueError(f"{path}: expected 12 numbers per line (row-major 3x4 pose), got {rows.shape[1]}")
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    poses[:, :3, :4] = rows.reshape(-1, 3, 4)
    return poses
