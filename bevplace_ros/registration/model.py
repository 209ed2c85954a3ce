"""RoITr-lite: a rotation-invariant matcher for LiDAR superpoints and their fine points (~0.9 M parameters).

Only point-pair features (ppf.py) enter the network: a two-stage PPF point encoder, a PPF patch
encoder per superpoint, then self-attention biased by superpoint-pair PPFs and cross-attention
between the two clouds. Rotating either input therefore leaves every output unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bevplace_ros.registration.ppf import point_pair_features


@dataclass(frozen=True)
class ModelConfig:
    """Widths and depth; the defaults give ~0.9 M parameters, small enough for a 2-core CPU."""

    point_dim: int = 64
    super_dim: int = 128
    heads: int = 4
    layers: int = 3  # each layer = PPF self-attention + cross-attention
    ppf_embed_dim: int = 16
    local_scale: float = 2.0  # metres; PPF distance scale inside point neighbourhoods and patches
    global_scale: float = 20.0  # metres; PPF distance scale between superpoints

    def __post_init__(self) -> None:
        for name in ("point_dim", "super_dim", "heads", "layers", "ppf_embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.super_dim % self.heads:
            raise ValueError(f"super_dim ({self.super_dim}) must be divisible by heads ({self.heads})")
        if not (self.local_scale > 0 and self.global_scale > 0):
            raise ValueError("local_scale and global_scale must be > 0")


@dataclass
class EncodedCloud:
    """Per-cloud network state that does not depend on the partner cloud (cacheable per keyframe)."""

    point_desc: torch.Tensor  # (F, point_dim) unit-norm fine descriptors
    super_feat: torch.Tensor  # (S, super_dim) patch features before attention
    geo: torch.Tensor  # (S, S, ppf_embed_dim) embedded superpoint-pair PPFs for geometric self-attention


def _mlp(*dims: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PointEncoder(nn.Module):
    """PPF PointNet over each fine point's neighbours, then one max-pool of the neighbours' features.

    Per-edge work is a single linear layer: (F, k, C) tensors are the memory-bound cost on CPU, so
    the deeper MLPs run per point, after pooling. The second pooling widens the field to ~4 m.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.point_dim
        self.scale = cfg.local_scale
        self.edge = nn.Linear(4, d)
        self.first = _mlp(2 * d, d, d)
        self.second = _mlp(2 * d, d, d)

    def forward(self, points: torch.Tensor, normals: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        ppf = point_pair_features(points[:, None], normals[:, None], points[neighbors], normals[neighbors], self.scale)
        edges = F.relu(self.edge(ppf))
        f1 = self.first(torch.cat([edges.amax(dim=1), edges.mean(dim=1)], dim=-1))  # mean ~ a soft PPF histogram
        return self.second(torch.cat([f1, f1[neighbors].amax(dim=1)], dim=-1))


class PatchEncoder(nn.Module):
    """Pools a superpoint's patch: each fine feature is shifted by an embedding of its PPF to the centre."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.scale = cfg.local_scale
        self.geo = nn.Linear(4, cfg.point_dim)
        self.out = _mlp(2 * cfg.point_dim, cfg.super_dim, cfg.super_dim)

    def forward(self, point_feat: torch.Tensor, points: torch.Tensor, normals: torch.Tensor,
                superpoints: torch.Tensor, super_normals: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        ppf = point_pair_features(superpoints[:, None], super_normals[:, None], points[patches], normals[patches],
                                  self.scale)
        members = F.relu(point_feat[patches] + self.geo(ppf))
        return self.out(torch.cat([members.amax(dim=1), members.mean(dim=1)], dim=-1))


class AttentionLayer(nn.Module):
    """Multi-head attention + FFN (post-norm). With `geo`, it is RoITr/GeoTransformer-style geometric
    attention: PPF embeddings bias the logits and are pooled into the values, so a superpoint learns
    *where* (in distance/angle terms) its context lies, not just what it contains."""

    def __init__(self, dim: int, heads: int, geo_dim: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.geo_bias = nn.Linear(geo_dim, heads) if geo_dim else None
        self.geo_value = nn.Linear(heads * geo_dim, dim) if geo_dim else None
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = _mlp(dim, 2 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, geo: torch.Tensor | None = None) -> torch.Tensor:
        n, dim = x.shape
        q = F.linear(x, self.qkv.weight[:dim], self.qkv.bias[:dim])
        k, v = F.linear(context, self.qkv.weight[dim:], self.qkv.bias[dim:]).chunk(2, dim=-1)
        q, k, v = (t.reshape(t.shape[0], self.heads, -1).transpose(0, 1) for t in (q, k, v))
        if self.geo_bias is None or geo is None:
            out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0].transpose(0, 1).reshape(n, dim)
        else:
            logits = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + self.geo_bias(geo).permute(2, 0, 1)
            attn = logits.softmax(dim=-1)  # (H, N, N)
            pooled_geo = torch.einsum("hij,ijc->ihc", attn, geo).reshape(n, -1)
            out = (attn @ v).transpose(0, 1).reshape(n, dim) + self.geo_value(pooled_geo)
        x = self.norm1(x + self.proj(out))
        return self.norm2(x + self.ffn(x))


class RoITrLite(nn.Module):
    """Encodes each cloud once (`encode`), then matches a pair with attention (`match`)."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        c = self.cfg
        self.point_encoder = PointEncoder(c)
        self.patch_encoder = PatchEncoder(c)
        self.ppf_embed = _mlp(4, c.ppf_embed_dim, c.ppf_embed_dim)
        self.self_layers = nn.ModuleList(AttentionLayer(c.super_dim, c.heads, c.ppf_embed_dim) for _ in range(c.layers))
        self.cross_layers = nn.ModuleList(AttentionLayer(c.super_dim, c.heads) for _ in range(c.layers))
        self.coarse_head = nn.Linear(c.super_dim, c.super_dim)
        self.fine_head = nn.Linear(c.point_dim, c.point_dim)

    def encode(self, points: torch.Tensor, normals: torch.Tensor, neighbors: torch.Tensor,
               superpoints: torch.Tensor, super_normals: torch.Tensor, patches: torch.Tensor) -> EncodedCloud:
        point_feat, super_feat = self.encode_patches(points, normals, neighbors, superpoints, super_normals, patches)
        return EncodedCloud(point_desc=self.fine_descriptors(point_feat), super_feat=super_feat,
                            geo=self.superpoint_geometry(superpoints, super_normals))

    def encode_patches(self, points: torch.Tensor, normals: torch.Tensor, neighbors: torch.Tensor,
                       superpoints: torch.Tensor, super_normals: torch.Tensor, patches: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Point features (before the fine head) and patch features: the PPF encoders that training may freeze."""
        point_feat = self.point_encoder(points, normals, neighbors)
        return point_feat, self.patch_encoder(point_feat, points, normals, superpoints, super_normals, patches)

    def fine_descriptors(self, point_feat: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fine_head(point_feat), dim=-1)

    def superpoint_geometry(self, superpoints: torch.Tensor, super_normals: torch.Tensor) -> torch.Tensor:
        """(S, S, ppf_embed_dim) embedded superpoint-pair PPFs, the bias of geometric self-attention."""
        ppf = point_pair_features(superpoints[:, None], super_normals[:, None], superpoints[None], super_normals[None],
                                  self.cfg.global_scale)
        return self.ppf_embed(ppf)

    def match(self, src: EncodedCloud, tgt: EncodedCloud) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm coarse descriptors of both clouds' superpoints after self/cross attention."""
        x, y = src.super_feat, tgt.super_feat
        for self_layer, cross_layer in zip(self.self_layers, self.cross_layers):
            x, y = self_layer(x, x, src.geo), self_layer(y, y, tgt.geo)
            x, y = cross_layer(x, y), cross_layer(y, x)
        return F.normalize(self.coarse_head(x), dim=-1), F.normalize(self.coarse_head(y), dim=-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cloud_tensors(arrays: Mapping[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    """A prepared cloud's arrays (PreparedCloud.arrays()) as the argument tuple of `encode` / `encode_patches`."""
    def f32(key: str) -> torch.Tensor:
        return torch.as_tensor(arrays[key], dtype=torch.float32, device=device)

    def i64(key: str) -> torch.Tensor:
        return torch.as_tensor(arrays[key], dtype=torch.long, device=device)

    return (f32("fine_points"), f32("fine_normals"), i64("fine_neighbors"), f32("superpoints"),
            f32("superpoint_normals"), i64("patches"))


def encode_arrays(model: RoITrLite, arrays: Mapping[str, np.ndarray], device: torch.device) -> EncodedCloud:
    """Run the per-cloud half of the network on a prepared cloud's arrays (PreparedCloud.arrays())."""
    return model.encode(*cloud_tensors(arrays, device))
