"""6x6 pose covariance from the GICP Hessian, in our order and in the ROS message order.

GICP minimises E = 0.5 * sum r_i^T M_i r_i (M_i = inverse combined point covariance). Near the
optimum cov(xi) ~= s^2 H^-1, where xi is small_gicp's right perturbation T <- T exp(xi), ordered
(rot x, y, z, trans x, y, z), and s^2 = 2E / (3n - 6) rescales the Mahalanobis residuals to their
observed size (the point covariances are shape estimates, not calibrated noise). It is a lower bound:
it ignores correlated errors and wrong data association, so treat it as an information shape.
"""

from __future__ import annotations

import numpy as np

# (rot, trans) -> (trans, rot): geometry_msgs/PoseWithCovariance uses x, y, z, roll, pitch, yaw
ROS_ORDER = np.array([3, 4, 5, 0, 1, 2])


def covariance_from_hessian(hessian: np.ndarray, error: float, num_inliers: int,
                            min_eigenvalue: float = 1e-10, max_eigenvalue: float = 1e4) -> np.ndarray:
    """s^2 H^-1 with eigenvalues clamped so the result is always symmetric positive definite."""
    h = 0.5 * (np.asarray(hessian, dtype=np.float64) + np.asarray(hessian, dtype=np.float64).T)
    dof = max(3 * num_inliers - 6, 1)
    scale = max(2.0 * error / dof, 1e-12)
    values, vectors = np.linalg.eigh(h)
    inv_values = np.clip(scale / np.maximum(values, 1e-12), min_eigenvalue, max_eigenvalue)
    cov = (vectors * inv_values) @ vectors.T
    return 0.5 * (cov + cov.T)


def _translation_share(hessian: np.ndarray, direction: np.ndarray) -> float:
    """Share of a Hessian's translation information that lies along a unit direction."""
    block = np.asarray(hessian, dtype=np.float64)[3:, 3:]
    return float(direction @ block @ direction) / max(float(np.trace(block)), 1e-300)


def degeneracy(pair: np.ndarray, source: np.ndarray, target: np.ndarray, rotation: np.ndarray) -> tuple[float, np.ndarray]:
    """(how many times smaller a share of the alignment's translation information lies along its weakest direction
    than of each cloud's own information there, that direction in the source frame).

    `pair` is the final alignment's Hessian; `source`, `target` each cloud's Hessian against itself
    (`refine.self_hessian`); `rotation` takes source directions to the target frame. Two scans of a street of
    repeated facades seen far apart can overlap in a strip that slides along the street: the pair then pins that
    direction far worse than either scan does alone, while a scene degenerate by itself (a bare corridor) pins it
    as badly in each scan as in the pair, so its true loops keep a ratio near 1 (the covariance carries the rest).
    """
    block = np.asarray(pair, dtype=np.float64)[3:, 3:]
    values, vectors = np.linalg.eigh(0.5 * (block + block.T))
    weakest = vectors[:, 0]
    pair_share = values[0] / values.sum() if values[0] > 0 else 0.0
    own = min(_translation_share(source, weakest), _translation_share(target, np.asarray(rotation) @ weakest))
    return (own / pair_share if pair_share > 0 else float("inf")), weakest


def to_ros_order(covariance: np.ndarray) -> np.ndarray:
    """Reorder (rot, trans) to (trans, rot), the PoseWithCovariance layout."""
    return covariance[np.ix_(ROS_ORDER, ROS_ORDER)]


def point_to_point_hessian(src: np.ndarray, tgt: np.ndarray, transform: np.ndarray) -> tuple[np.ndarray, float]:
    """Gauss-Newton Hessian and 0.5*SSE of matched points, same perturbation as GICP (used without GICP)."""
    rot = transform[:3, :3]
    residual = src @ rot.T + transform[:3, 3] - tgt
    skew = np.zeros((len(src), 3, 3))
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -src[:, 2], src[:, 1], -src[:, 0]
    skew -= skew.transpose(0, 2, 1)
    jac = np.concatenate([-rot @ skew, np.broadcast_to(rot, skew.shape)], axis=2)  # (C, 3, 6)
    return np.einsum("cki,ckj->ij", jac, jac), 0.5 * float((residual ** 2).sum())
