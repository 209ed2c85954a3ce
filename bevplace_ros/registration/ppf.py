"""Point-pair features: the only geometry the network sees, so its output cannot depend on the pose.

PPF(p_i, n_i, p_j, n_j) = (|d|, |n_i . d^|, |n_j . d^|, |n_i . n_j|), d = p_j - p_i (Drost et al. 2010,
as used by RoITr). Absolute cosines make it blind to the arbitrary sign of PCA normals, which cannot
be oriented consistently once the sensor origin is unknown.
"""

from __future__ import annotations

import torch


def point_pair_features(p_i: torch.Tensor, n_i: torch.Tensor, p_j: torch.Tensor, n_j: torch.Tensor,
                        distance_scale: float) -> torch.Tensor:
    """Broadcasting PPF of shape (..., 4); the distance is divided by `distance_scale` to stay O(1)."""
    d = p_j - p_i
    dist = torch.linalg.norm(d, dim=-1, keepdim=True)
    d_hat = d / dist.clamp_min(1e-6)
    return torch.cat([
        dist / distance_scale,
        (n_i * d_hat).sum(-1, keepdim=True).abs(),
        (n_j * d_hat).sum(-1, keepdim=True).abs(),
        (n_i * n_j).sum(-1, keepdim=True).abs(),
    ], dim=-1)
