"""KITTI odometry layout: velodyne/NNNNNN.bin (float32 x, y, z, intensity) + poses.txt (+ times.txt).

The scans may also sit directly in the folder (as in the provided kitti_scans/), still in file-name order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from bevplace_ros.datasets.frames import DatasetError, Frame
from bevplace_ros.se3 import load_kitti_poses


def read_kitti(path: str | Path, scan_period_s: float = 0.1) -> Iterator[Frame]:
    """Frames in file-name order, indexed by the file's number (000015.bin -> 15); stamps from
    times.txt (else number x scan_period_s); gt from poses.txt (one line per scan) if present.

    The folder is checked here, before the first frame is read, so a bad data set fails at open time.
    """
    root = Path(path)
    folder = root / "velodyne" if (root / "velodyne").is_dir() else root
    scans = sorted(folder.glob("*.bin"))
    if not scans:
        raise DatasetError(f"{folder} holds no .bin scans")
    try:
        poses = load_kitti_poses(str(root / "poses.txt")) if (root / "poses.txt").is_file() else None
        numbers = np.array([int(p.stem) if p.stem.isdigit() else i for i, p in enumerate(scans)])
        times = np.loadtxt(root / "times.txt", dtype=float, ndmin=1) if (root / "times.txt").is_file() else numbers * scan_period_s
    except ValueError as err:
        raise DatasetError(f"{root}: {err}") from None
    for name, values in (("poses.txt", poses), ("times.txt", times)):
        if values is not None and len(values) != len(scans):
            raise DatasetError(f"{root}/{name} has {len(values)} entries for {len(scans)} scans")
    return _frames(scans, numbers, times, poses)


def read_kitti_scan(path: str | Path) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity of one KITTI .bin scan (little-endian float32 quadruples)."""
    scan = Path(path)
    size = scan.stat().st_size
    if size % 16:
        raise DatasetError(f"{scan}: {size} bytes is not a whole number of (x, y, z, intensity) float32 points")
    return np.fromfile(scan, dtype="<f4").reshape(-1, 4).astype(np.float32, copy=False)


def _frames(scans: list[Path], numbers: np.ndarray, times: np.ndarray, poses: np.ndarray | None) -> Iterator[Frame]:
    for index, scan in enumerate(scans):
        yield Frame(int(numbers[index]), float(times[index]), read_kitti_scan(scan), None if poses is None else poses[index])
