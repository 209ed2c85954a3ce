"""A BEVPlace-style folder (imgs/NNNNNN.png + pose.txt), read lazily: thousands of frames,
only the ones asked for are decoded."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from bevplace_ros.bev import bev_from_uint8
from bevplace_ros.se3 import load_kitti_poses


class BEVDatasetError(ValueError):
    """The folder is not a BEVPlace image folder or an image cannot be read."""


class BEVImageFolder:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._images = sorted((self.root / "imgs").glob("*.png"))
        if not self._images:
            raise BEVDatasetError(f"{self.root}: no imgs/*.png (expected a BEVPlace folder like kitti_bev/00)")
        if not (self.root / "pose.txt").is_file():
            raise BEVDatasetError(f"{self.root}: missing pose.txt")

    def __len__(self) -> int:
        return len(self._images)

    def image(self, i: int) -> np.ndarray:
        """Frame i as float32 (H, W) in [0, 1], the scale make_bev produces."""
        path = self._images[i]
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None or raw.ndim != 2:
            raise BEVDatasetError(f"{path}: not a single-channel image")
        return bev_from_uint8(raw)

    def images(self, indices: np.ndarray | list[int]) -> np.ndarray:
        return np.stack([self.image(int(i)) for i in indices])

    @cached_property
    def poses(self) -> np.ndarray:
        """(N, 4, 4) LiDAR poses in the sequence's first frame."""
        poses = load_kitti_poses(str(self.root / "pose.txt"))
        if len(poses) != len(self):
            raise BEVDatasetError(f"{self.root}: pose.txt has {len(poses)} poses for {len(self)} images")
        return poses
