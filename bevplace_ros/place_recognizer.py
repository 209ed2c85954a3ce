"""The place-recognition facade the pipeline calls: scan -> BEV -> features -> descriptor/pose.

Everything returned is numpy on the CPU so callers (nodes, database, registration) need no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np

from bevplace_ros.bev import BEVConfig, make_bev
from bevplace_ros.bev_pose import BEVKeypoints, BEVPose, BEVPoseConfig, estimate_pose, extract_keypoints
from bevplace_ros.device import DEVICE_CHOICES
from bevplace_ros.models.checkpoint import BEV_PRESET_OF_MODEL, DEFAULT_MODEL, MODEL_KINDS, load_place_model, shipped_weights


@dataclass(frozen=True)
class PlaceRecognizerConfig:
    bev: BEVConfig | None = None  # None: the recipe `model`'s shipped weights were trained on
    pose: BEVPoseConfig = field(default_factory=BEVPoseConfig)
    rotations: int = 8  # group size of the equivariant backbone; cost grows linearly (bevplace_v1: fixed 5 x 5 group)
    device: str = "auto"
    model: str = DEFAULT_MODEL  # "bevplace_v1" (the BEVPlace authors' network) or "bevplace_equivariant" (ours)
    weights: str | None = ""  # "": the shipped weights of `model`; None or "random": untrained, seeded; a file must hold `model`
    seed: int = 0  # seeds the untrained model only
    batch_size: int = 8  # images per network call in describe_images

    def __post_init__(self) -> None:
        if not 1 <= self.rotations <= 64:
            raise ValueError(f"PlaceRecognizerConfig.rotations must be in [1, 64], got {self.rotations}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"PlaceRecognizerConfig.device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"PlaceRecognizerConfig.model must be one of {MODEL_KINDS}, got {self.model!r}")
        if self.batch_size < 1:
            raise ValueError(f"PlaceRecognizerConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.bev is None:
            object.__setattr__(self, "bev", BEVConfig.preset(BEV_PRESET_OF_MODEL[self.model]))


@dataclass(frozen=True)
class PlaceFeatures:
    """What one keyframe contributes: image, equivariant local features, global descriptor."""

    bev: np.ndarray  # (H, W) float32 in [0, 1]
    local: np.ndarray  # (128, h, w) float32: the feature map (bevplace_v1: its 5-pixel keypoint grid)
    descriptor: np.ndarray  # (D,) float32, unit norm
    keypoints: BEVKeypoints  # computed once here, reused for every pose query against this keyframe


class PlaceRecognizer:
    def __init__(self, cfg: PlaceRecognizerConfig = PlaceRecognizerConfig()) -> None:
        import torch

        from bevplace_ros.device import resolve_device

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        weights = None if cfg.weights is None else (cfg.weights if cfg.weights == "random" else shipped_weights(cfg.weights, cfg.model))
        self.model = load_place_model(weights, rotations=cfg.rotations, seed=cfg.seed, kind=cfg.model).for_inference().to(self.device)
        self._torch = torch

    @property
    def descriptor_dim(self) -> int:
        return self.model.descriptor_dim

    def describe(self, points: np.ndarray) -> PlaceFeatures:
        """Features of one scan (N, >=3) in the sensor frame."""
        return self.describe_images(make_bev(points, self.cfg.bev)[None])[0]

    def describe_images(self, images: np.ndarray) -> list[PlaceFeatures]:
        """Features of (B, H, W) BEV images in [0, 1], e.g. the published BEVPlace PNGs / 255."""
        images = np.asarray(images, dtype=np.float32)
        size = self.cfg.bev.size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"images must be (B, {size}, {size}) for this BEVConfig, got shape {images.shape}")
        out: list[PlaceFeatures] = []
        with self._torch.inference_mode():
            for start in range(0, len(images), self.cfg.batch_size):
                chunk = images[start : start + self.cfg.batch_size]
                local, desc = self.model(self._torch.from_numpy(chunk)[:, None].to(self.device))
                local_np, desc_np = local.cpu().numpy(), desc.cpu().numpy()
                for bev, loc, d in zip(chunk, local_np, desc_np):
                    out.append(PlaceFeatures(bev, loc, d, extract_keypoints(bev, loc, self.cfg.bev, self.cfg.pose, self.model.feature_coords)))
        return out

    def relative_pose(self, a: PlaceFeatures, b: PlaceFeatures) -> BEVPose | None:
        """T_a_b (maps scan b into scan a), or None when the BEV features do not agree on one."""
        return estimate_pose(a.keypoints, b.keypoints, self.cfg.pose)
