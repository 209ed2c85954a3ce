"""Robust pose from the network's correspondences: local-to-global hypotheses (GeoTransformer's LGR).

One candidate transform per matched patch pair with a batched weighted Kabsch, every candidate scored
on all correspondences at once, the winner polished by re-solving on its inliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bevplace_ros.registration.matching import Correspondences


@dataclass(frozen=True)
class PoseConfig:
    """Inlier radius and effort of the hypothesise-and-verify step."""

    inlier_distance: float = 1.2  # metres; ~fine voxel size, the spacing error of fine matches
    min_group_size: int = 3  # patch pairs with fewer fine matches give no hypothesis
    refine_iterations: int = 5
    hypothesis_chunk: int = 500  # hypotheses scored at once, bounding memory to chunk x correspondences

    def __post_init__(self) -> None:
        if not self.inlier_distance > 0:
            raise ValueError(f"inlier_distance must be > 0, got {self.inlier_distance}")
        if self.min_group_size < 3:
            raise ValueError(f"min_group_size must be >= 3 (a rigid pose needs 3 points), got {self.min_group_size}")
        for name in ("refine_iterations", "hypothesis_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class PoseEstimate:
    transform: torch.Tensor  # (4, 4) float64, T_target_source
    inliers: torch.Tensor  # (C,) bool over the input correspondences
    inlier_ratio: float
    num_hypotheses: int


def weighted_kabsch(src: torch.Tensor, tgt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Batched weighted least-squares rigid transforms (B, 4, 4) mapping src (B, N, 3) onto tgt."""
    w = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
    src_c = (w[..., None] * src).sum(dim=1)
    tgt_c = (w[..., None] * tgt).sum(dim=1)
    cov = ((src - src_c[:, None]) * w[..., None]).transpose(1, 2) @ (tgt - tgt_c[:, None])
    u, _, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(vh.transpose(1, 2) @ u.transpose(1, 2)))
    fix = torch.ones_like(src_c)
    fix[:, 2] = torch.where(sign == 0, torch.ones_like(sign), sign)
    rot = vh.transpose(1, 2) @ (fix[..., None] * u.transpose(1, 2))
    out = torch.eye(4, dtype=src.dtype, device=src.device).repeat(src.shape[0], 1, 1)
    out[:, :3, :3] = rot
    out[:, :3, 3] = tgt_c - (rot @ src_c[..., None])[..., 0]
    return out


def _residuals(transforms: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """(H, C) distances between transformed source and target for every hypothesis."""
    moved = src @ transforms[:, :3, :3].transpose(1, 2) + transforms[:, None, :3, 3]
    return torch.linalg.norm(moved - tgt, dim=-1)


def select_and_refine(hypotheses: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, weight: torch.Tensor,
                      cfg: PoseConfig) -> PoseEstimate:
    """Pick the hypothesis with the largest inlier weight, then re-fit it on its own inliers."""
    best_score, best = -1.0, hypotheses[0]
    for chunk in hypotheses.split(cfg.hypothesis_chunk):
        score = ((_residuals(chunk, src, tgt) < cfg.inlier_distance) * weight).sum(dim=1)
        i = int(score.argmax())
        if float(score[i]) > best_score:
            best_score, best = float(score[i]), chunk[i]
    transform = best
    inliers = _residuals(transform[None], src, tgt)[0] < cfg.inlier_distance
    for _ in range(cfg.refine_iterations):
        if int(inliers.sum()) < 3:
            break
        transform = weighted_kabsch(src[inliers][None], tgt[inliers][None], weight[inliers][None])[0]
        inliers = _residuals(transform[None], src, tgt)[0] < cfg.inlier_distance
    ratio = float(inliers.float().mean()) if inliers.numel() else 0.0
    return PoseEstimate(transform=transform, inliers=inliers, inlier_ratio=ratio, num_hypotheses=len(hypotheses))


def local_to_global(corr: Correspondences, cfg: PoseConfig, extra: torch.Tensor | None = None) -> PoseEstimate | None:
    """One weighted-Kabsch hypothesis per matched patch pair (+ `extra`, e.g. a prior), scored globally."""
    src, tgt, w = corr.src.double(), corr.tgt.double(), corr.weight.double()
    if len(src) < 3:
        return None
    order = torch.argsort(corr.group, stable=True)
    group = corr.group[order]
    counts = torch.bincount(group, minlength=corr.num_groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(group), device=group.device) - starts[group]
    width = int(counts.max())
    pad_src = src.new_zeros(corr.num_groups, width, 3)
    pad_tgt = src.new_zeros(corr.num_groups, width, 3)
    pad_w = src.new_zeros(corr.num_groups, width)
    pad_src[group, slot], pad_tgt[group, slot], pad_w[group, slot] = src[order], tgt[order], w[order]
    usable = counts >= cfg.min_group_size
    hypotheses = weighted_kabsch(pad_src[usable], pad_tgt[usable], pad_w[usable])
    if extra is not None:
        hypotheses = torch.cat([hypotheses, extra.to(hypotheses)], dim=0)
    if len(hypotheses) == 0:
        return None
    return select_and_refine(hypotheses, src, tgt, w, cfg)

