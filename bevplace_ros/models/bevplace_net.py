"""BEVPlace network: group-convolution over R image rotations -> rotation-equivariant local
features -> NetVLAD -> rotation-invariant global descriptor (optionally PCA-projected)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bevplace_ros.models.backbone import FEATURE_DIM, STRIDE, ResNet34Stem, fuse_batchnorm
from bevplace_ros.models.netvlad import NetVLAD


@dataclass(frozen=True)
class BEVPlaceNetConfig:
    """Architecture; `rotations` may differ between training and inference (weights are shared)."""

    rotations: int = 8
    clusters: int = 64
    pca_dim: int = 0  # 0: no projection, the descriptor is clusters * 128 wide
    input_blur_px: float = 1.0  # Gaussian sigma [pixels] of the anti-aliasing blur before the rotations; 0: none

    def __post_init__(self) -> None:
        if not 1 <= self.rotations <= 64:
            raise ValueError(f"BEVPlaceNetConfig.rotations must be in [1, 64], got {self.rotations}")
        if not 1 <= self.clusters <= 1024:
            raise ValueError(f"BEVPlaceNetConfig.clusters must be in [1, 1024], got {self.clusters}")
        if not 0 <= self.pca_dim <= self.clusters * FEATURE_DIM:
            raise ValueError(f"BEVPlaceNetConfig.pca_dim must be in [0, {self.clusters * FEATURE_DIM}], got {self.pca_dim}")
        if not 0 <= self.input_blur_px <= 10:
            raise ValueError(f"BEVPlaceNetConfig.input_blur_px must be in [0, 10], got {self.input_blur_px}")

    def to_dict(self) -> dict:
        return asdict(self)


def rotation_thetas(angles: torch.Tensor) -> torch.Tensor:
    """(R, 2, 3) affine_grid matrices that rotate an image by `angles` (radians, counter-clockwise
    as displayed, i.e. a positive yaw of the BEV's x-up/y-left frame) about its centre."""
    c, s = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(angles)
    # affine_grid maps output coords to input coords, so the inverse rotation goes here; with
    # grid y pointing down a displayed CCW rotation by a is [[c, -s], [s, c]] in (x, y) grid coords.
    return torch.stack([torch.stack([c, -s, zeros], -1), torch.stack([s, c, zeros], -1)], -2)


def rotate_images(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate image k of (N, C, H, W) by angles[k] about its centre pixel, zeros outside.

    align_corners=True puts the rotation centre on the centre of pixels 0 and W-1, the same
    physical point in the image and in the stride-8 feature map (see `pad_to_stride`).
    """
    theta = rotation_thetas(angles).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def padded_size(size: int) -> int:
    """Smallest 8m+1 >= size: then feature k sits exactly on input pixel 8k (see BEVPlaceNet)."""
    return STRIDE * math.ceil((size - 1) / STRIDE) + 1


def pad_to_stride(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad (B, C, H, W) to 8m+1 pixels a side so the image centre and the feature-map
    centre coincide; otherwise rotating features back turns them about a point ~3 px off."""
    h, w = images.shape[-2:]
    ph, pw = padded_size(h) - h, padded_size(w) - w
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def inscribed_disc(maps: torch.Tensor) -> torch.Tensor:
    """(H, W) mask of the disc inscribed in the maps' square.

    A square turned by a non-multiple of 90 degrees loses its corners and gains empty ones, so
    only the inscribed disc holds the same content at every rotation; masking input and
    rotated-back features to it is what makes the descriptor invariant at any yaw (measured on
    KITTI 06: self-retrieval after a 45 deg turn went from 1 in 10 to 8 in 10, untrained net).
    """
    h, w = maps.shape[-2:]
    rows = torch.arange(h, device=maps.device, dtype=maps.dtype) - (h - 1) / 2
    cols = torch.arange(w, device=maps.device, dtype=maps.dtype) - (w - 1) / 2
    radius = (min(h, w) - 1) / 2
    return ((rows[:, None] ** 2 + cols[None, :] ** 2) <= radius**2).to(maps.dtype)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), zeros beyond the border.

    A BEV density image is a speckle of single cells; resampling it at a non-grid angle moves
    that speckle by fractions of a cell, which the CNN sees as new content. Blurring by ~1 cell
    first removes the frequencies that alias: with it, self-retrieval of 12 KITTI places rotated
    by 17-300 degrees went from 61 of 72 to 72 of 72 top-1 (8 rotations, same weights).
    """
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    rows = F.conv2d(images, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)


def feature_coords(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Image pixel coordinates -> fractional feature-map coordinates (inverse of the padding)."""
    return (pixels + (padded_size(size) - size) // 2) / STRIDE


class BEVPlaceNet(nn.Module):
    """forward(images (B,1,H,W)) -> (local (B,128,h,w), global (B,D)); local[k] sits on pixel 8k-pad."""

    kind = "bevplace_equivariant"
    feature_coords = staticmethod(feature_coords)  # pixel -> local-map cell, for bev_pose

    def __init__(self, cfg: BEVPlaceNetConfig = BEVPlaceNetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNet34Stem(in_channels=1)
        self.vlad = NetVLAD(clusters=cfg.clusters, dim=FEATURE_DIM)
        self.projection: nn.Linear | None = nn.Linear(self.vlad.out_dim, cfg.pca_dim) if cfg.pca_dim else None
        self.rotations = cfg.rotations
        self.channels_last = False  # set by for_inference: oneDNN convolutions run faster NHWC on CPU

    @property
    def descriptor_dim(self) -> int:
        return self.cfg.pca_dim or self.vlad.out_dim

    def local_features(self, images: torch.Tensor) -> torch.Tensor:
        """Max over R rotated copies, each feature map rotated back: equivariant to the group.

        The R copies run as one backbone batch (one call beats R small ones on CPU and GPU).
        """
        images = pad_to_stride(images)
        if self.cfg.input_blur_px > 0:
            images = gaussian_blur(images, self.cfg.input_blur_px)
        images = images * inscribed_disc(images)
        b, r = images.shape[0], self.rotations
        angles = torch.arange(r, device=images.device, dtype=images.dtype) * (2.0 * math.pi / r)
        rotated = rotate_images(images.repeat(r, 1, 1, 1), angles.repeat_interleave(b))
        if self.channels_last:
            rotated = rotated.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(rotated).contiguous()
        back = rotate_images(feats, -angles.repeat_interleave(b))
        back = back * inscribed_disc(back)
        return back.view(r, b, *back.shape[1:]).amax(dim=0)

    @torch.no_grad()
    def init_vlad_from_images(self, images: torch.Tensor, seed: int = 0) -> None:
        """Seed NetVLAD centroids by k-means of these images' local features (before training)."""
        local = self.local_features(images)
        self.vlad.init_centroids(local.permute(0, 2, 3, 1).reshape(-1, local.shape[1]), seed=seed)

    def global_descriptor(self, local: torch.Tensor) -> torch.Tensor:
        desc = self.vlad(local)
        if self.projection is not None:
            desc = F.normalize(self.projection(desc), dim=1)
        return desc

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, H, W), got {tuple(images.shape)}")
        local = self.local_features(images)
        return local, self.global_descriptor(local)

    def for_inference(self) -> "BEVPlaceNet":
        """Eval copy with BN folded into the convolutions and NHWC layout; same outputs, less time
        (see `bevplace-ros benchmark place`)."""
        fast = BEVPlaceNet(self.cfg)
        fast.load_state_dict(self.state_dict())
        fast.rotations = self.rotations
        fast.backbone = fuse_batchnorm(fast.backbone).to(memory_format=torch.channels_last)
        fast.channels_last = True
        return fast.eval()

    def set_projection(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Install a fitted (pca_dim, D) projection; the config records its width."""
        weight_t = torch.as_tensor(weight, dtype=torch.float32)
        linear = nn.Linear(weight_t.shape[1], weight_t.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight_t)
            linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        self.projection = linear
        self.cfg = replace(self.cfg, pca_dim=weight_t.shape[0])


def build_seeded_model(cfg: BEVPlaceNetConfig = BEVPlaceNetConfig(), seed: int = 0) -> BEVPlaceNet:
    """Untrained model with reproducible weights, without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BEVPlaceNet(cfg).eval()


def fit_pca_projection(descriptors: np.ndarray, dim: int, whiten: bool = True, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(weight (dim, D), bias (dim,)) of a PCA(+whitening) of training descriptors (N, D).

    Whitening equalises the variance of the kept components, which NetVLAD papers find improves
    retrieval after truncation; y = W (x - mean) is folded into one affine layer.
    """
    x = np.asarray(descriptors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be (N, D), got shape {x.shape}")
    if not 1 <= dim <= min(x.shape):
        raise ValueError(f"PCA dim must be in [1, min(N, D) = {min(x.shape)}], got {dim}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    weight = vt[:dim]
    if whiten:
        std = s[:dim] / np.sqrt(max(len(x) - 1, 1))
        weight = weight / (std[:, None] + eps)
    return weight.astype(np.float32), (-weight @ mean).astype(np.float32)
