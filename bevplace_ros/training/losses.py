"""Metric-learning losses on unit-norm global descriptors (Euclidean distances in [0, 2])."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("triplet", "quadruplet")


def triplet_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over tuples and negatives of max(0, margin + d(q, p) - d(q, n)).

    query/positive (B, D), negatives (B, K, D). Averaging over the K negatives (not only the
    hardest) keeps a gradient when the hardest negative is already pushed out of the margin.
    """
    d_pos = (query - positive).norm(dim=1)
    d_neg = (query[:, None, :] - negatives).norm(dim=2)
    return F.relu(margin + d_pos[:, None] - d_neg).mean()


def quadruplet_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, other: torch.Tensor, margin: float, margin2: float) -> torch.Tensor:
    """Triplet term plus max(0, margin2 + d(q, p) - d(n_1, o)) (Chen et al., CVPR 2017):
    the positive distance must also beat distances between pairs that share no frame with the query."""
    d_pos = (query - positive).norm(dim=1)
    d_other = (negatives[:, 0, :] - other).norm(dim=1)
    return triplet_loss(query, positive, negatives, margin) + F.relu(margin2 + d_pos - d_other).mean()
