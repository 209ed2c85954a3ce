"""The one record every data-set plug-in yields, and the dispatcher that picks the plug-in.

The pipeline consumes `Frame`s only, so it never knows whether data came from a bag, a KITTI
folder or pre-rendered BEV images.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np


class DatasetError(ValueError):
    """A path that is not a readable data set, or one whose content is inconsistent."""


@dataclass
class Frame:
    index: int
    stamp: float  # seconds
    points: np.ndarray  # (N, 4) float32 x, y, z, intensity in the LiDAR frame
    gt_pose: np.ndarray | None = None  # 4x4 T_map_lidar
    odom_pose: np.ndarray | None = None  # 4x4 T_odom_lidar


def dataset_kind(path: str | Path) -> str:
    """'rosbag2' (metadata.yaml), 'kitti' (velodyne/*.bin or *.bin) or 'bev_images' (imgs/ + pose.txt)."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if (root / "metadata.yaml").is_file():
        return "rosbag2"
    if (root / "velodyne").is_dir() or (root.is_dir() and any(root.glob("*.bin"))):
        return "kitti"
    if (root / "imgs").is_dir() and (root / "pose.txt").is_file():
        return "bev_images"
    raise DatasetError(f"{root}: not a rosbag2 folder (metadata.yaml), a KITTI folder (velodyne/*.bin or *.bin) or a BEV image folder (imgs/ + pose.txt)")


def open_dataset(path: str | Path, **options) -> Iterable[Frame]:
    """Frames of the data set at `path`, whichever kind it is; `options` go to the reader."""
    kind = dataset_kind(path)
    if kind == "rosbag2":
        from bevplace_ros.datasets.rosbag2 import read_rosbag2

        return read_rosbag2(path, **options)
    if kind == "kitti":
        from bevplace_ros.datasets.kitti import read_kitti

        return read_kitti(path, **options)
    try:
        module = importlib.import_module("bevplace_ros.datasets.bev_images")
    except ModuleNotFoundError as err:
        if err.name != "bevplace_ros.datasets.bev_images":
            raise
        raise DatasetError(f"{path}: BEV image folders need bevplace_ros.datasets.bev_images, which is not installed") from None
    reader = getattr(module, "open_bev_images", None)
    if reader is None:
        raise DatasetError(f"{path}: bevplace_ros.datasets.bev_images has no open_bev_images(path) reader")
    return reader(path, **options)
