"""Bounded per-keyframe storage (clouds, BEV keypoints) for runs of many hours.

Memory stays under `max_in_memory` entries: the oldest entries are spilled to `spill_dir` as .npy
files when one is configured (they can still be loaded for a loop with an old place), or dropped
otherwise (a loop to a dropped keyframe is then reported as unverifiable, never guessed).

The place map keeps each keyframe's BEV keypoints here (`BEVKeypoints.packed`: float16, (2 + 128)
x 2 = 260 bytes a keypoint, at most `BEVPoseConfig.max_keypoints` = 500 of them, so <= 130 kB a
keyframe; about 51 kB for the median published KITTI image, 196 keypoints), bounded by
`place.bev_in_memory` (2,000 keyframes: <= 260 MB, ~100 MB on KITTI-like scans).
"""

from __future__ import annotations

import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevplace_ros.versioned_npz import load_versioned_npz, save_versioned_npz

FORMAT_NAME = "bevplace_ros.keyframe_store"
FORMAT_VERSION = 1


class KeyframeStoreError(ValueError):
    """A saved store that is missing, corrupt, foreign or of another format version."""


@dataclass(frozen=True)
class KeyframeStoreConfig:
    max_in_memory: int = 2000  # entries kept in RAM
    spill_dir: str = ""  # folder for spilled entries; empty = drop the oldest instead
    max_on_disk: int = 100000  # entries kept on disk before the oldest are deleted

    def __post_init__(self) -> None:
        if self.max_in_memory < 1 or self.max_on_disk < 0:
            raise ValueError("max_in_memory must be >= 1 and max_on_disk >= 0")


class KeyframeStore:
    """Key -> array, oldest-first eviction to disk or oblivion."""

    def __init__(self, cfg: KeyframeStoreConfig) -> None:
        self.cfg = cfg
        self._memory: OrderedDict[int, np.ndarray] = OrderedDict()
        self._disk: OrderedDict[int, Path] = OrderedDict()
        self._spill = Path(tempfile.mkdtemp(prefix="spill-", dir=_ensure(cfg.spill_dir))) if cfg.spill_dir else None
        self.dropped = 0

    def __contains__(self, key: int) -> bool:
        return key in self._memory or key in self._disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    def memory_bytes(self) -> int:
        return sum(a.nbytes for a in self._memory.values())

    def put(self, key: int, value: np.ndarray) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.cfg.max_in_memory:
            self._evict()

    def get(self, key: int) -> np.ndarray | None:
        if key in self._memory:
            return self._memory[key]
        path = self._disk.get(key)
        return None if path is None else np.load(path)

    def keys(self) -> list[int]:
        return sorted([*self._memory, *self._disk])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """All entries (memory and disk) as keys, offsets and one concatenated array; entries share a trailing shape."""
        keys = self.keys()
        arrays = [self.get(k) for k in keys]
        data = np.concatenate(arrays) if arrays else np.zeros((0,), dtype=np.float32)
        offsets = np.cumsum([0] + [len(a) for a in arrays])
        return {"keys": np.array(keys, dtype=np.int64), "offsets": offsets, "data": data}

    def from_arrays(self, keys: np.ndarray, offsets: np.ndarray, data: np.ndarray, source: str) -> int:
        """Replace the entries with those of `to_arrays`; on a mismatch the current entries are kept."""
        if len(offsets) != len(keys) + 1 or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
            raise KeyframeStoreError(f"{source}: keys and data lengths disagree")
        self.clear()
        for i, key in enumerate(keys):
            self.put(int(key), data[offsets[i]:offsets[i + 1]])
        return len(keys)

    def save(self, path: str | Path) -> Path:
        """All entries in one file, atomically."""
        return save_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, self.to_arrays())

    def load(self, path: str | Path) -> int:
        """Replace the entries with a saved store's; on any error the current entries are kept."""
        saved = load_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, ("keys", "offsets", "data"), KeyframeStoreError)
        return self.from_arrays(saved["keys"], saved["offsets"], saved["data"], str(path))

    def clear(self) -> None:
        self._memory.clear()
        for path in self._disk.values():
            path.unlink(missing_ok=True)
        self._disk.clear()

    def close(self) -> None:
        """Delete the spill folder of this run."""
        self.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)

    def _evict(self) -> None:
        key, value = self._memory.popitem(last=False)
        if self._spill is None or self.cfg.max_on_disk == 0:
            self.dropped += 1
            return
        path = self._spill / f"{key}.npy"
        np.save(path, value)  # a per-run cache, deleted on close: no fsync needed
        self._disk[key] = path
        while len(self._disk) > self.cfg.max_on_disk:
            _, old = self._disk.popitem(last=False)
            old.unlink(missing_ok=True)
            self.dropped += 1


def _ensure(folder: str) -> str:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return folder
