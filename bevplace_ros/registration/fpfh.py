"""Compact vectorised FPFH (Rusu et al. 2009) and mutual matching: the classical path and baseline.

Written here because open3d is not available. Normals are flipped towards the sensor (the cloud's
origin), which FPFH needs for stable angles; that is why this path, unlike the network, assumes each
cloud is given in its own sensor frame.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from bevplace_ros.registration.preprocess import PreparedCloud

BINS = 11


def _hist(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per-point normalised histogram of (F, k) values into (F, BINS)."""
    idx = np.clip(((values - low) / (high - low) * BINS).astype(np.int64), 0, BINS - 1)
    rows = np.repeat(np.arange(len(values)), values.shape[1])
    counts = np.bincount(rows * BINS + idx.ravel(), minlength=len(values) * BINS).reshape(len(values), BINS)
    return counts / values.shape[1]


def fpfh(points: np.ndarray, normals: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """(F, 33) FPFH descriptors over each point's fixed-size neighbourhood."""
    n = normals * np.where((normals * points).sum(1, keepdims=True) > 0, -1.0, 1.0)  # face the sensor
    diff = points[neighbors] - points[:, None]
    dist = np.linalg.norm(diff, axis=-1)
    d_hat = diff / np.maximum(dist, 1e-9)[..., None]
    u = np.broadcast_to(n[:, None], diff.shape)
    v = np.cross(u, d_hat)
    v /= np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-9)
    w = np.cross(u, v)
    nq = n[neighbors]
    alpha = (v * nq).sum(-1)
    phi = (u * d_hat).sum(-1)
    theta = np.arctan2((w * nq).sum(-1), (u * nq).sum(-1))
    spfh = np.concatenate([_hist(alpha, -1, 1), _hist(phi, -1, 1), _hist(theta, -np.pi, np.pi)], axis=1)
    inv_d = 1.0 / np.maximum(dist, 1e-3)
    neighbour_term = (spfh[neighbors] * inv_d[..., None]).sum(1) / inv_d.sum(1, keepdims=True)
    return spfh + neighbour_term


def mutual_matches(desc_a: np.ndarray, desc_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs that are each other's nearest neighbour in descriptor space."""
    _, ab = cKDTree(desc_b).query(desc_a)
    _, ba = cKDTree(desc_a).query(desc_b)
    keep = ba[ab] == np.arange(len(desc_a))
    return np.nonzero(keep)[0], ab[keep]


def cloud_fpfh(cloud: PreparedCloud) -> np.ndarray:
    """FPFH of the fine points, cached on the prepared cloud."""
    if "fpfh" not in cloud.features:
        cloud.features["fpfh"] = fpfh(cloud.fine_points, cloud.fine_normals, cloud.fine_neighbors)
    return cloud.features["fpfh"]
