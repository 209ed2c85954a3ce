"""3-DoF relative pose between two BEV images: the first guess handed to registration.

Keypoints come from FAST on the density image (corners of walls, poles, parked cars), their
descriptors are sampled from the rotation-equivariant feature map, so matches survive any yaw;
a vectorised 2-D rigid RANSAC keeps the geometrically consistent ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bevplace_ros.bev import BEVConfig
from bevplace_ros.models.backbone import STRIDE
from bevplace_ros.models.bevplace_net import feature_coords
from bevplace_ros.se3 import xyyaw_to_matrix

# Image pixel (row, col) -> fractional (row, col) on a model's local feature map, given the image size.
FeatureCoords = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class BEVPoseConfig:
    fast_threshold: int = 10  # on the 0..255 density image (one count step is 25.5)
    max_keypoints: int = 500  # strongest FAST responses kept per image
    ransac_hypotheses: int = 2000
    inlier_threshold_m: float = 0.5
    min_inliers: int = 6  # fewer than this: no pose (None) instead of a guess
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fast_threshold < 255:
            raise ValueError(f"BEVPoseConfig.fast_threshold must be in (0, 255), got {self.fast_threshold}")
        for name in ("max_keypoints", "ransac_hypotheses"):
            if getattr(self, name) < 1:
                raise ValueError(f"BEVPoseConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.inlier_threshold_m > 0:
            raise ValueError(f"BEVPoseConfig.inlier_threshold_m must be > 0, got {self.inlier_threshold_m}")
        if self.min_inliers < 2:
            raise ValueError(f"BEVPoseConfig.min_inliers must be >= 2 (two points fix a 2-D rigid motion), got {self.min_inliers}")


@dataclass(frozen=True)
class BEVPose:
    """T_a_b in the plane: maps points of scan b into scan a's frame (metres, radians)."""

    x: float
    y: float
    yaw: float
    inliers: int
    matches: int

    def matrix(self) -> np.ndarray:
        return xyyaw_to_matrix(self.x, self.y, self.yaw)


@dataclass(frozen=True)
class BEVKeypoints:
    """Keypoints of one BEV image: metric (x, y) in the sensor frame and unit descriptors."""

    xy: np.ndarray  # (K, 2) float64
    descriptors: np.ndarray  # (K, C) float32, L2-normalised

    def packed(self) -> np.ndarray:
        """(K, 2 + C) float16: what a keyframe keeps for later pose queries, (2 + C) * 2 bytes a keypoint.

        float16 costs nothing that matters: x, y within +-64 m keep 3 cm steps (BEV cells are 40 cm)
        and unit descriptors ~1e-3, far below the margin between mutual nearest neighbours.
        """
        return np.concatenate([self.xy, self.descriptors], axis=1).astype(np.float16)

    @classmethod
    def unpack(cls, packed: np.ndarray) -> BEVKeypoints:
        if packed.ndim != 2 or packed.shape[1] < 3:
            raise ValueError(f"packed keypoints must be (K, 2 + C), got shape {packed.shape}")
        return cls(packed[:, :2].astype(np.float64), np.ascontiguousarray(packed[:, 2:], dtype=np.float32))


def detect_keypoints(bev: np.ndarray, cfg: BEVPoseConfig) -> np.ndarray:
    """(K, 2) float (row, col) of the strongest FAST corners; deterministic for a given image."""
    image = np.clip(np.round(bev * 255.0), 0, 255).astype(np.uint8)
    detector = cv2.FastFeatureDetector_create(threshold=cfg.fast_threshold, nonmaxSuppression=True)
    found = detector.detect(image)
    if not found:
        return np.zeros((0, 2))
    pts = np.array([(k.pt[1], k.pt[0], k.response) for k in found])
    # Only the inscribed disc carries features (BEVPlaceNet masks the rest); keep one stride-8
    # feature cell clear of its edge so the bilinear samples are not half masked.
    centre = (image.shape[0] - 1) / 2
    pts = pts[np.hypot(pts[:, 0] - centre, pts[:, 1] - centre) <= centre - STRIDE]
    order = np.lexsort((pts[:, 1], pts[:, 0], -pts[:, 2]))[: cfg.max_keypoints]
    return pts[order, :2]


def sample_descriptors(local: np.ndarray | torch.Tensor, rows_cols: np.ndarray, image_size: int, coords: FeatureCoords = feature_coords) -> np.ndarray:
    """Bilinear samples of the (C, h, w) feature map at image pixel positions, L2-normalised."""
    feats = torch.as_tensor(local, dtype=torch.float32)
    if len(rows_cols) == 0:
        return np.zeros((0, feats.shape[0]), dtype=np.float32)
    fc = coords(torch.as_tensor(rows_cols, dtype=torch.float32), image_size)
    h, w = feats.shape[-2:]
    grid = torch.stack([2 * fc[:, 1] / (w - 1) - 1, 2 * fc[:, 0] / (h - 1) - 1], dim=-1)
    sampled = F.grid_sample(feats[None], grid[None, None], mode="bilinear", align_corners=True)[0, :, 0].T
    return np.ascontiguousarray(F.normalize(sampled, dim=1).numpy())


def extract_keypoints(bev: np.ndarray, local: np.ndarray | torch.Tensor, bev_cfg: BEVConfig, cfg: BEVPoseConfig,
                      coords: FeatureCoords = feature_coords) -> BEVKeypoints:
    """FAST keypoints of the image with descriptors from the model's local features; `coords` is
    the model's pixel -> feature-map mapping (the default: BEVPlaceNet's stride-8 map)."""
    rows_cols = detect_keypoints(bev, cfg)
    return BEVKeypoints(bev_cfg.pixel_to_xy(rows_cols[:, 0], rows_cols[:, 1]), sample_descriptors(local, rows_cols, bev.shape[0], coords))


def mutual_matches(desc_a: np.ndarray, desc_b: np.ndarray) -> np.ndarray:
    """(M, 2) index pairs that are each other's nearest neighbour by cosine similarity."""
    if len(desc_a) == 0 or len(desc_b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    sim = (torch.from_numpy(desc_a) @ torch.from_numpy(desc_b).T).numpy()  # torch's pool: numpy's BLAS threads wake slowly
    best_b = sim.argmax(axis=1)
    best_a = sim.argmax(axis=0)
    ia = np.flatnonzero(best_a[best_b] == np.arange(len(desc_a)))
    return np.stack([ia, best_b[ia]], axis=1)


def fit_rigid_2d(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares R (2x2), t with dst ≈ R src + t (2-D Kabsch)."""
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    h = (src - mu_s).T @ (dst - mu_d)
    yaw = np.arctan2(h[0, 1] - h[1, 0], h[0, 0] + h[1, 1])
    R = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    return R, mu_d - R @ mu_s


def ransac_rigid_2d(src: np.ndarray, dst: np.ndarray, cfg: BEVPoseConfig) -> np.ndarray:
    """Inlier mask of the best two-point hypothesis; all hypotheses scored at once as (H, M) residuals."""
    rng = np.random.default_rng(cfg.seed)
    m = len(src)
    i = rng.integers(0, m, cfg.ransac_hypotheses)
    j = (i + rng.integers(1, m, cfg.ransac_hypotheses)) % m  # j != i
    vs, vd = src[j] - src[i], dst[j] - dst[i]
    yaw = np.arctan2(vd[:, 1], vd[:, 0]) - np.arctan2(vs[:, 1], vs[:, 0])
    cos, sin = np.cos(yaw), np.sin(yaw)
    tx = dst[i, 0] - (cos * src[i, 0] - sin * src[i, 1])
    ty = dst[i, 1] - (sin * src[i, 0] + cos * src[i, 1])
    c, s, tx, ty = (v[:, None] for v in (cos, sin, tx, ty))  # (H, 1) against (M,) -> (H, M)
    rx = c * src[:, 0] - s * src[:, 1] + tx - dst[:, 0]
    ry = s * src[:, 0] + c * src[:, 1] + ty - dst[:, 1]
    residual = np.hypot(rx, ry)
    rigid = np.abs(np.linalg.norm(vs, axis=1) - np.linalg.norm(vd, axis=1)) < cfg.inlier_threshold_m
    scores = np.where(rigid, (residual < cfg.inlier_threshold_m).sum(axis=1), -1)
    return residual[int(np.argmax(scores))] < cfg.inlier_threshold_m


def estimate_pose(a: BEVKeypoints, b: BEVKeypoints, cfg: BEVPoseConfig) -> BEVPose | None:
    """T_a_b from keypoints of scans a and b, or None when fewer than min_inliers matches agree."""
    pairs = mutual_matches(a.descriptors, b.descriptors)
    if len(pairs) < cfg.min_inliers:
        return None
    src, dst = b.xy[pairs[:, 1]], a.xy[pairs[:, 0]]
    inliers = ransac_rigid_2d(src, dst, cfg)
    for _ in range(2):  # refit on the consensus set; the refined motion may gather a few more
        if inliers.sum() < cfg.min_inliers:
            return None
        R, t = fit_rigid_2d(src[inliers], dst[inliers])
        inliers = np.linalg.norm(src @ R.T + t - dst, axis=1) < cfg.inlier_threshold_m
    if inliers.sum() < cfg.min_inliers:
        return None
    return BEVPose(float(t[0]), float(t[1]), float(np.arctan2(R[1, 0], R[0, 0])), int(inliers.sum()), len(pairs))
