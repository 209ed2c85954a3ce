"""KISS-Matcher (Lim et al., ICRA 2025; PyPI `kiss-matcher`) as the field baseline for global registration.

Faster-PFH + graph-theoretic outlier pruning + GNC in C++. Its descriptors live inside the C++ matcher
and cannot be handed back, so only its input (the cloud voxelised at `voxel`) is cached per keyframe;
Faster-PFH runs again for every pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.registration.preprocess import PreparedCloud, voxel_representatives


@dataclass(frozen=True)
class KissConfig:
    """Voxel of the matcher's input; its normal/FPFH radii and noise bounds scale with it (library gains)."""

    voxel: float = 1.0  # metres; 0.5 m is as accurate after GICP on the KITTI pairs and ~2x slower

    def __post_init__(self) -> None:
        if not self.voxel > 0:
            raise ValueError(f"KissConfig.voxel must be > 0, got {self.voxel}")


@dataclass(frozen=True)
class KissEstimate:
    transform: np.ndarray  # (4, 4) T_target_source, before GICP
    valid: bool
    num_inliers: int  # correspondences consistent with the final translation
    inlier_ratio: float  # pruned (mutually consistent) share of the initial correspondences
    num_correspondences: int  # initial Faster-PFH correspondences
    src_matched: np.ndarray  # (C, 3) initial correspondences, source side
    tgt_matched: np.ndarray  # (C, 3)
    match_ms: float  # Faster-PFH extraction + matching (per pair: not cacheable)
    pose_ms: float  # pruning + GNC solve


def kiss_points(cloud: PreparedCloud, cfg: KissConfig) -> np.ndarray:
    """The matcher's float32 input, cached on the prepared cloud."""
    key = f"kiss_points_{cfg.voxel}"
    if key not in cloud.features:
        idx = voxel_representatives(cloud.gicp_points, cfg.voxel)
        cloud.features[key] = np.ascontiguousarray(cloud.gicp_points[idx], dtype=np.float32)
    return cloud.features[key]


def kiss_estimate(src: PreparedCloud, tgt: PreparedCloud, cfg: KissConfig) -> KissEstimate:
    """One KISS-Matcher run on the cached voxelised clouds."""
    import kiss_matcher

    matcher = kiss_matcher.KISSMatcher(kiss_matcher.KISSMatcherConfig(voxel_size=cfg.voxel, use_voxel_sampling=False))
    solution = matcher.estimate(kiss_points(src, cfg), kiss_points(tgt, cfg))
    transform = np.eye(4)
    transform[:3, :3] = np.asarray(solution.rotation, dtype=np.float64)
    transform[:3, 3] = np.asarray(solution.translation, dtype=np.float64).ravel()
    initial = len(matcher.get_initial_correspondences())
    src_kp, tgt_kp = (np.asarray(side, dtype=np.float64).reshape(-1, 3) for side in
                      matcher.get_keypoints_from_initial_matching())
    valid = bool(solution.valid) and bool(np.isfinite(transform).all())
    return KissEstimate(
        transform=transform if valid else np.eye(4), valid=valid, num_inliers=int(matcher.get_num_final_inliers()),
        inlier_ratio=len(matcher.get_final_correspondences()) / initial if initial else 0.0,
        num_correspondences=initial, src_matched=src_kp, tgt_matched=tgt_kp,
        match_ms=(matcher.get_extraction_time() + matcher.get_matching_time()) * 1e3,
        pose_ms=(matcher.get_rejection_time() + matcher.get_solver_time()) * 1e3,
    )
