"""Coarse-to-fine correspondences: dual-softmax over superpoints, then mutual matches inside patch pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MatchingConfig:
    """How many superpoint pairs to expand and how sharp the dual-softmax is."""

    num_coarse: int = 128  # superpoint pairs kept; each becomes one pose hypothesis
    coarse_temperature: float = 0.05
    fine_temperature: float = 0.05
    min_fine_score: float = 0.05  # dual-softmax probability below which a fine match is dropped

    def __post_init__(self) -> None:
        if self.num_coarse < 1:
            raise ValueError(f"num_coarse must be >= 1, got {self.num_coarse}")
        for name in ("coarse_temperature", "fine_temperature"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.min_fine_score < 1.0:
            raise ValueError(f"min_fine_score must be in [0, 1), got {self.min_fine_score}")


@dataclass
class Correspondences:
    """Fine point matches grouped by the superpoint pair (patch pair) they came from."""

    src: torch.Tensor  # (C, 3)
    tgt: torch.Tensor  # (C, 3)
    weight: torch.Tensor  # (C,)
    group: torch.Tensor  # (C,) index of the coarse pair, in [0, num_groups)
    num_groups: int


def dual_softmax(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row-softmax times column-softmax (batched over leading dims): high only for mutual favourites."""
    logits = similarity / temperature
    return logits.softmax(dim=-1) * logits.softmax(dim=-2)


def coarse_matches(src_desc: torch.Tensor, tgt_desc: torch.Tensor, cfg: MatchingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (K,) into source and target superpoints of the K highest dual-softmax scores."""
    scores = dual_softmax(src_desc @ tgt_desc.T, cfg.coarse_temperature)
    k = min(cfg.num_coarse, scores.numel())
    flat = scores.flatten().topk(k).indices
    return flat // scores.shape[1], flat % scores.shape[1]


def fine_matches(src_idx: torch.Tensor, tgt_idx: torch.Tensor, src_patches: torch.Tensor, tgt_patches: torch.Tensor,
                 src_points: torch.Tensor, tgt_points: torch.Tensor, src_desc: torch.Tensor, tgt_desc: torch.Tensor,
                 cfg: MatchingConfig) -> Correspondences:
    """Mutual best matches between the fine points of each matched patch pair, all pairs in one batch."""
    ps, pt = src_patches[src_idx], tgt_patches[tgt_idx]  # (K, P)
    scores = dual_softmax(src_desc[ps] @ tgt_desc[pt].transpose(1, 2), cfg.fine_temperature)  # (K, P, P)
    row_best = scores.argmax(dim=2)
    col_best = scores.argmax(dim=1)
    rows = torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    mutual = col_best.gather(1, row_best) == rows
    best = scores.gather(2, row_best[..., None])[..., 0]
    keep = mutual & (best >= cfg.min_fine_score)
    group, row = keep.nonzero(as_tuple=True)
    col = row_best[group, row]
    return Correspondences(src=src_points[ps[group, row]], tgt=tgt_points[pt[group, col]], weight=best[group, row],
                           group=group, num_groups=int(src_idx.numel()))
