"""Place-recognition sequences as cached uint8 BEV images + ground-truth poses.

Rasterising a scan costs far more than reading a 151x151 uint8 array, and every epoch, every
evaluation and every baseline walks the same frames, so each (data set, frame range, BEVConfig)
is rendered once and kept as .npy files in a cache folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bevplace_ros.atomic_io import atomic_write
from bevplace_ros.bev import BEVConfig, make_bev

if TYPE_CHECKING:
    from bevplace_ros.datasets.frames import Frame

DEFAULT_CACHE_DIR = Path(".cache") / "place"
_SPEC = re.compile(r"^(?P<path>.+?)(?:@(?P<start>\d*):(?P<end>\d*)(?::(?P<step>\d+))?)?$")


class PlaceDataError(ValueError):
    """A data-set spec or data set that cannot serve as a place-recognition sequence."""


@dataclass(frozen=True)
class SequenceSpec:
    """A data set and the half-open frame range [start, end) used from it (end None: to the last),
    every `step`-th frame (frames ~1 m apart are near-duplicates for training)."""

    path: Path
    start: int = 0
    end: int | None = None
    step: int = 1

    @classmethod
    def parse(cls, text: str) -> SequenceSpec:
        """'PATH' or 'PATH@START:END[:STEP]' (either bound may be empty), e.g. kitti_bev/00@0:3000 or kitti_bev/00@0:3000:3."""
        match = _SPEC.match(text)
        if not match:
            raise PlaceDataError(f"data set spec {text!r}: expected PATH or PATH@START:END")
        start = int(match["start"]) if match["start"] else 0
        end = int(match["end"]) if match["end"] else None
        if end is not None and end <= start:
            raise PlaceDataError(f"data set spec {text!r}: END ({end}) must be > START ({start})")
        step = int(match["step"]) if match["step"] else 1
        if step < 1:
            raise PlaceDataError(f"data set spec {text!r}: STEP must be >= 1")
        return cls(Path(match["path"]), start, end, step)

    def __str__(self) -> str:
        if self.start == 0 and self.end is None and self.step == 1:
            return str(self.path)
        return f"{self.path}@{self.start}:{'' if self.end is None else self.end}" + (f":{self.step}" if self.step > 1 else "")


@dataclass(frozen=True)
class PlaceSequence:
    """One drive: images[i] was taken at poses[i]; frame_ids are the data set's own frame indices."""

    name: str
    images: np.ndarray  # (N, H, W) uint8, value = 255 x make_bev density
    poses: np.ndarray  # (N, 4, 4) T_map_lidar
    frame_ids: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.images)

    @property
    def positions(self) -> np.ndarray:
        return self.poses[:, :3, 3]

    @property
    def headings(self) -> np.ndarray:
        """Yaw of the LiDAR x axis in the map (radians): tells same- from reverse-direction revisits."""
        return np.arctan2(self.poses[:, 1, 0], self.poses[:, 0, 0])


def sequence_cache_key(spec: SequenceSpec, bev: BEVConfig = BEVConfig()) -> str:
    """Changes whenever the source files, the frame range or the rasterisation changes."""
    root = spec.path.resolve()
    stamp = max((p.stat().st_mtime_ns for p in (root, *root.iterdir())), default=0) if root.is_dir() else root.stat().st_mtime_ns
    text = json.dumps({"path": str(root), "mtime": stamp, "start": spec.start, "end": spec.end, "step": spec.step, "bev": asdict(bev)}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def cached_arrays(cache_dir: Path, key: str, names: tuple[str, ...], compute: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Arrays `names` stored under cache_dir/key, computed once; each file written atomically."""
    folder = Path(cache_dir) / key
    paths = [folder / f"{name}.npy" for name in names]
    if all(p.is_file() for p in paths):
        return tuple(np.load(p) for p in paths)
    arrays = compute()
    for path, array in zip(paths, arrays):
        atomic_write(path, lambda tmp, a=array: save_npy(tmp, a))
    return arrays


def save_npy(path: Path, array: np.ndarray) -> None:
    """For atomic_write: np.save given a path would append ".npy" to the temporary name."""
    with path.open("wb") as handle:
        np.save(handle, array)


def frames_in_range(spec: SequenceSpec) -> Iterator[Frame]:
    """Frames [start, end) (every step-th) of a rosbag2 / KITTI folder, in data-set order."""
    from bevplace_ros.datasets.frames import open_dataset

    for position, frame in enumerate(open_dataset(spec.path)):
        if position >= spec.start and (position - spec.start) % spec.step == 0:
            if spec.end is not None and position >= spec.end:
                return
            yield frame


def _render_frames(spec: SequenceSpec, bev: BEVConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise every frame of a rosbag2 / KITTI folder; each must carry a ground-truth pose."""
    images, poses, ids = [], [], []
    for frame in frames_in_range(spec):
        if frame.gt_pose is None:
            raise PlaceDataError(f"{spec.path}: frame {frame.index} has no ground-truth pose; place training and evaluation need one per frame")
        images.append(np.round(make_bev(frame.points, bev) * 255.0).astype(np.uint8))
        poses.append(frame.gt_pose)
        ids.append(frame.index)
    if not images:
        raise PlaceDataError(f"{spec}: no frames in the requested range")
    return np.stack(images), np.stack(poses).astype(np.float64), np.asarray(ids, dtype=np.int64)


def iter_bev_images(spec: SequenceSpec, bev: BEVConfig = BEVConfig()) -> Iterator[np.ndarray]:
    """(H, W) float32 BEV of every frame in range, ground truth or not (what `embed` needs)."""
    from bevplace_ros.datasets.bev_images import BEVImageFolder
    from bevplace_ros.datasets.frames import DatasetError, dataset_kind

    try:
        kind = dataset_kind(spec.path)
    except DatasetError as err:
        raise PlaceDataError(str(err)) from None
    if kind != "bev_images":
        yield from (make_bev(frame.points, bev) for frame in frames_in_range(spec))
        return
    folder = BEVImageFolder(spec.path)
    for i in range(spec.start, len(folder) if spec.end is None else min(spec.end, len(folder)), spec.step):
        image = folder.image(i)
        if image.shape != (bev.size, bev.size):
            raise PlaceDataError(f"{spec.path}: images are {image.shape}, this BEVConfig makes {bev.size}x{bev.size}")
        yield image


def _read_bev_folder(spec: SequenceSpec, bev: BEVConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Published BEVPlace PNGs are already uint8 densities; only their size must match `bev`."""
    from bevplace_ros.datasets.bev_images import BEVImageFolder

    folder = BEVImageFolder(spec.path)
    end = len(folder) if spec.end is None else min(spec.end, len(folder))
    ids = np.arange(spec.start, end, spec.step, dtype=np.int64)
    if not len(ids):
        raise PlaceDataError(f"{spec}: no frames in the requested range (folder has {len(folder)})")
    images = np.round(folder.images(ids) * 255.0).astype(np.uint8)  # exact inverse of bev_from_uint8
    if images.shape[1:] != (bev.size, bev.size):
        raise PlaceDataError(f"{spec.path}: images are {images.shape[1:]}, this BEVConfig makes {bev.size}x{bev.size}")
    return images, folder.poses[ids], ids


def load_sequence(spec: SequenceSpec | str, bev: BEVConfig = BEVConfig(), cache_dir: Path = DEFAULT_CACHE_DIR) -> PlaceSequence:
    """BEV images + poses of a rosbag2, KITTI-style or BEVPlace image folder, cached after the first read."""
    from bevplace_ros.datasets.frames import DatasetError, dataset_kind

    spec = SequenceSpec.parse(spec) if isinstance(spec, str) else spec
    try:
        kind = dataset_kind(spec.path)
    except DatasetError as err:
        raise PlaceDataError(str(err)) from None
    render = _read_bev_folder if kind == "bev_images" else _render_frames
    images, poses, ids = cached_arrays(cache_dir, sequence_cache_key(spec, bev), ("images", "poses", "frame_ids"), lambda: render(spec, bev))
    return PlaceSequence(str(spec), images, poses, ids)
