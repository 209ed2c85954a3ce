"""The real scan pairs of the provided data (`../shared/data`): KITTI 00 and the small_gicp pair (another sensor).

Each pair comes with the relative pose its data set gives (KITTI poses, small_gicp's estimate); those are
not exact (unsynchronised, not motion-compensated), so evaluation refines them with GICP first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevplace_ros.registration.errors import RegistrationInputError

KITTI_PAIRS = {"kitti_scans": ((0, 5), (0, 15), (5, 15)), "kitti_scans_more": ((94, 95), (198, 199))}
_PLY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "uchar": "u1", "uint8": "u1",
              "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4", "short": "<i2", "ushort": "<u2"}


@dataclass(frozen=True)
class RealPair:
    name: str
    source: np.ndarray  # (N, >=3) in the source sensor frame
    target: np.ndarray
    T_given: np.ndarray  # (4, 4) T_target_source as the data set states it


def read_ply(path: str | Path) -> np.ndarray:
    """xyz (float64, (N, 3)) of a binary little-endian PLY whose vertex properties are all scalars."""
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise RegistrationInputError(f"{path}: not a PLY file")
    header = raw[:end].decode("ascii", "replace").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise RegistrationInputError(f"{path}: only binary little-endian PLY is supported")
    count = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    fields = [(p[2], _PLY_TYPES[p[1]]) for p in (line.split() for line in header) if p[0] == "property"]
    data = np.frombuffer(raw, dtype=np.dtype(fields), count=count, offset=end + len(b"end_header\n"))
    return np.stack([data[axis].astype(np.float64) for axis in "xyz"], axis=1)


def load_real_pairs(root: str | Path) -> list[RealPair]:
    """Every real pair present under `root` (the shared data folder); missing sub-folders are skipped."""
    from bevplace_ros.datasets.kitti import read_kitti_scan
    from bevplace_ros.se3 import invert, load_kitti_poses

    root = Path(root)
    pairs = []
    for folder, frame_pairs in KITTI_PAIRS.items():
        if not (root / folder).is_dir():
            continue
        frames = sorted({f for pair in frame_pairs for f in pair})
        poses = dict(zip(frames, load_kitti_poses(str(root / folder / "poses.txt"))))
        for a, b in frame_pairs:
            pairs.append(RealPair(f"kitti00_{a}-{b}", read_kitti_scan(root / folder / f"{a:06d}.bin"),
                                  read_kitti_scan(root / folder / f"{b:06d}.bin"), invert(poses[b]) @ poses[a]))
    gicp = root / "small_gicp_pair"
    if gicp.is_dir():
        pairs.append(RealPair("small_gicp", read_ply(gicp / "source.ply"), read_ply(gicp / "target.ply"),
                              np.loadtxt(gicp / "T_target_source.txt")))
    return pairs
