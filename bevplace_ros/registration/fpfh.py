"""Vectorised FPFH (Rusu et al. 2009) and mutual matching, computed once per keyframe.

Written here because open3d is not available and KISS-Matcher keeps its Faster-PFH descriptors inside
C++ (recomputed for every pair). `radius_fpfh` follows Faster-PFH's recipe (normals over a radius,
PCL's pair features, 1/distance-weighted neighbour histograms over a larger radius), so the descriptors
can be cached with the keyframe and a pair costs only the matching. Normals are flipped towards the
sensor (the cloud's origin), which FPFH needs for stable angles; that is why the classical path,
unlike the network, assumes each cloud is given in its own sensor frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


BINS = 11


def _hist(values: np.ndarray, low: float, high: float, valid: np.ndarray) -> np.ndarray:
    """Per-point normalised histogram of (F, k) values into (F, BINS), counting only `valid` entries."""
    idx = np.clip(((values - low) / (high - low) * BINS).astype(np.int64), 0, BINS - 1)
    rows = np.broadcast_to(np.arange(len(values))[:, None], values.shape)
    counts = np.bincount((rows * BINS + idx)[valid], minlength=len(values) * BINS).reshape(len(values), BINS)
    return counts / np.maximum(valid.sum(axis=1, keepdims=True), 1)


@dataclass(frozen=True)
class FpfhConfig:
    """Radii of the per-keyframe FPFH: Faster-PFH's gains of 3 and 5 voxels at KISS-Matcher's 1 m voxel (2.5 / 6 m
    registered 2 more of 20 validation pairs 10-14 m apart but let 2 false loops into the demo: docs/registration.md)."""

    normal_radius: float = 3.0  # metres; plane fit for the normal
    feature_radius: float = 5.0  # metres; neighbours whose pair features enter the histogram
    max_neighbors: int = 128  # cap per ball, the nearest kept (a 5 m ball of a 1 m-voxel KITTI scan: <= ~150 points)
    min_neighbors: int = 3  # fewer valid neighbours give no stable normal or histogram: the point is dropped

    def __post_init__(self) -> None:
        if not 0 < self.normal_radius <= self.feature_radius:
            raise ValueError(f"need 0 < normal_radius <= feature_radius, got {self.normal_radius}, {self.feature_radius}")
        if self.min_neighbors < 3 or self.max_neighbors < self.min_neighbors:
            raise ValueError(f"need 3 <= min_neighbors <= max_neighbors, got {self.min_neighbors}, {self.max_neighbors}")


def _ball_normals(points: np.ndarray, balls: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normals facing the sensor, count of ball points) from a plane fit over each point's ball."""
    count = inside.sum(axis=1)
    members = points[balls] * inside[..., None]
    mean = members.sum(axis=1) / np.maximum(count, 1)[:, None]
    dev = (points[balls] - mean[:, None]) * inside[..., None]
    _, vectors = np.linalg.eigh(np.einsum("nki,nkj->nij", dev, dev))
    normals = vectors[:, :, 0]
    return normals * np.where((normals * mean).sum(axis=1, keepdims=True) > 0, -1.0, 1.0), count


def _pair_features(points: np.ndarray, normals: np.ndarray, balls: np.ndarray) -> tuple[np.ndarray, ...]:
    """PCL's (theta, alpha, phi) for every point and ball member, source/target ordered as PCL does; + validity."""
    diff = points[balls] - points[:, None]
    d_hat = diff / np.maximum(np.linalg.norm(diff, axis=-1), 1e-9)[..., None]
    n1, n2 = np.broadcast_to(normals[:, None], diff.shape), normals[balls]
    a1, a2 = (n1 * d_hat).sum(-1), (n2 * d_hat).sum(-1)
    swap = (np.abs(a1) < np.abs(a2))[..., None]  # the point whose normal is closer to the line is the source
    u, n_other = np.where(swap, n2, n1), np.where(swap, n1, n2)
    d_hat = np.where(swap, -d_hat, d_hat)
    phi = np.where(swap[..., 0], -a2, a1)
    v = np.cross(d_hat, u)
    v_norm = np.linalg.norm(v, axis=-1)
    v /= np.maximum(v_norm, 1e-12)[..., None]
    w = np.cross(u, v)
    theta = np.arctan2((w * n_other).sum(-1), (u * n_other).sum(-1))
    return theta, (v * n_other).sum(-1), phi, v_norm > 1e-9


def radius_fpfh(points: np.ndarray, cfg: FpfhConfig, wanted: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints (K, 3), unit-length descriptors (K, 33) float32): FPFH over radius balls, once per keyframe.
    `wanted` (N,) bool: the points that may be keypoints; all points still enter the neighbours' histograms."""
    n = len(points)
    dist, balls = cKDTree(points).query(points, k=min(cfg.max_neighbors, n), distance_upper_bound=cfg.feature_radius)
    dist, balls = dist.reshape(n, -1), balls.reshape(n, -1)
    inside = np.isfinite(dist)
    balls = np.where(inside, balls, 0)
    normals, count = _ball_normals(points, balls, inside & (dist < cfg.normal_radius))
    ok = count >= cfg.min_neighbors
    theta, alpha, phi, defined = _pair_features(points, normals, balls)
    pair_ok = inside & ok[balls] & (dist > 0) & defined
    spfh = np.concatenate([_hist(theta, -np.pi, np.pi, pair_ok), _hist(alpha, -1, 1, pair_ok),
                           _hist(phi, -1, 1, pair_ok)], axis=1)
    keep = ok & ((inside & ok[balls]).sum(axis=1) >= cfg.min_neighbors) & (True if wanted is None else wanted)
    dist, balls, inside = dist[keep], balls[keep], inside[keep]  # only keypoints get a descriptor
    weights = np.where(inside & ok[balls], 1.0 / np.maximum(dist, 1e-9), 0.0)
    weights[dist == 0] = 1.0  # the point's own histogram
    desc = np.einsum("nk,nkb->nb", weights, spfh[balls]).reshape(len(balls), 3, BINS)
    desc /= np.maximum(desc.sum(axis=-1, keepdims=True), 1e-12)  # each sub-histogram sums to 1, as PCL's to 100
    desc = desc.reshape(len(balls), 3 * BINS)
    return points[keep], (desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _row_topk(a: "torch.Tensor", b_t: "torch.Tensor", k: int, chunk: int) -> "torch.Tensor":
    """(N, k) indices of the k largest of a @ b_t per row, in row blocks reusing one buffer (a fresh N x M
    product costs more in page faults than in arithmetic)."""
    import torch

    best = torch.empty(len(a), k, dtype=torch.long)
    buffer = torch.empty(min(chunk, len(a)), b_t.shape[1])
    for start in range(0, len(a), chunk):
        block = buffer[: min(chunk, len(a) - start)]
        torch.mm(a[start:start + chunk], b_t, out=block)
        best[start:start + chunk] = block.argmax(dim=1, keepdim=True) if k == 1 else block.topk(k, dim=1).indices
    return best


def mutual_topk(desc_a: np.ndarray, desc_b: np.ndarray, k: int = 1, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs each among the other's k most similar unit descriptors (k = 1: mutual nearest neighbours)."""
    import torch

    a, b = torch.from_numpy(np.ascontiguousarray(desc_a)), torch.from_numpy(np.ascontiguousarray(desc_b))
    k = max(1, min(k, len(a), len(b)))
    ab = _row_topk(a, b.T.contiguous(), k, chunk)  # (N, k)
    ba = _row_topk(b, a.T.contiguous(), k, chunk)  # (M, k)
    mutual = (ba[ab] == torch.arange(len(a))[:, None, None]).any(dim=2)  # (N, k): a_i is among its match's k
    rows, slots = torch.nonzero(mutual, as_tuple=True)
    return rows.numpy(), ab[rows, slots].numpy()
