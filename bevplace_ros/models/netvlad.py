"""NetVLAD pooling: a sum over locations, so a permutation of locations (a rotation of the
equivariant feature map) leaves the global descriptor unchanged."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NetVLAD(nn.Module):
    """Soft-assign local features to `clusters` centroids and aggregate residuals (K x D)."""

    def __init__(self, clusters: int = 64, dim: int = 128, alpha: float = 100.0) -> None:
        super().__init__()
        self.clusters, self.dim, self.alpha = clusters, dim, alpha
        self.assign = nn.Conv2d(dim, clusters, kernel_size=1, bias=True)
        self.centroids = nn.Parameter(torch.rand(clusters, dim))
        self._tie_assignment_to_centroids()

    @property
    def out_dim(self) -> int:
        return self.clusters * self.dim

    def _tie_assignment_to_centroids(self) -> None:
        """Start the soft assignment as a softmax over -alpha*||x - c||^2 (Arandjelovic et al.)."""
        with torch.no_grad():
            c = F.normalize(self.centroids, dim=1)
            self.centroids.copy_(c)
            self.assign.weight.copy_((2.0 * self.alpha * c)[:, :, None, None])
            self.assign.bias.copy_(-self.alpha * c.pow(2).sum(dim=1))

    def set_centroids(self, centroids: torch.Tensor) -> None:
        """Start from data-driven centroids (k-means on local features), the assignment tied to them."""
        with torch.no_grad():
            self.centroids.copy_(centroids)
        self._tie_assignment_to_centroids()

    @torch.no_grad()
    def init_centroids(self, features: torch.Tensor, iterations: int = 20, seed: int = 0) -> None:
        """Spherical k-means of sampled local features (N, D): the usual NetVLAD start, without
        which random centroids put almost every feature in one cluster."""
        x = F.normalize(features.float(), dim=1)
        if len(x) < self.clusters:
            raise ValueError(f"need at least {self.clusters} features to seed {self.clusters} clusters, got {len(x)}")
        gen = torch.Generator().manual_seed(seed)
        c = x[torch.randperm(len(x), generator=gen)[: self.clusters].to(x.device)]
        for _ in range(iterations):
            assign = (x @ c.T).argmax(dim=1)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=self.clusters)[:, None]
            c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        self.centroids.copy_(c)
        self._tie_assignment_to_centroids()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, K*D), intra-normalised then L2-normalised."""
        x = F.normalize(x, dim=1)
        soft = F.softmax(self.assign(x).flatten(2), dim=1)  # (B, K, N)
        flat = x.flatten(2)  # (B, D, N)
        vlad = torch.bmm(soft, flat.transpose(1, 2)) - soft.sum(dim=2, keepdim=True) * self.centroids  # (B, K, D)
        vlad = F.normalize(vlad, dim=2)
        return F.normalize(vlad.flatten(1), dim=1)
