"""The place node's whole state: network, descriptor database, BEV keypoints, keyframe positions.

Saved as one versioned, atomically written file so a map survives restarts (and a crash during a
save leaves the previous map loadable). Format version 2 keeps each keyframe's packed BEV keypoints;
version 1 (BEV images, before the network ran once per keyframe) is refused with a message saying so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevplace_ros.bev import BEVConfig
from bevplace_ros.descriptor_db import DatabaseConfig, DatabaseError, DescriptorDatabase
from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig, KeyframeStoreError
from bevplace_ros.loop_detector import DetectedKeyframe, LoopDetector, LoopDetectorConfig
from bevplace_ros.models.checkpoint import DEFAULT_MODEL, DEFAULT_WEIGHTS, RANDOM_WEIGHTS
from bevplace_ros.place_recognizer import PlaceRecognizer, PlaceRecognizerConfig
from bevplace_ros.versioned_npz import load_versioned_npz, save_versioned_npz

FORMAT_NAME = "bevplace_ros.place_map"
FORMAT_VERSION = 2


class PlaceMapError(ValueError):
    """A saved map that cannot be used: unreadable, foreign, or made by another model."""


@dataclass(frozen=True)
class PlaceMapConfig:
    weights: str = ""  # empty: the shipped weights of `model`; "random": untrained and seeded (baselines, tests)
    model: str = DEFAULT_MODEL  # "bevplace_v1" (the BEVPlace authors' network) or "bevplace_equivariant" (the package's)
    device: str = "auto"
    rotations: int = 8
    max_keyframes: int = 200_000  # descriptor database bound (oldest thinned beyond it)
    bev_in_memory: int = 2000  # keyframes whose BEV keypoints (<= 130 kB each, see keyframe_store) are kept in RAM
    spill_dir: str = ""  # where older keyframes' keypoints go; empty drops them (no BEV guess for very old matches)


class PlaceMap:
    def __init__(self, cfg: PlaceMapConfig, bev: BEVConfig, detection: LoopDetectorConfig) -> None:
        weights = cfg.weights or str(DEFAULT_WEIGHTS[cfg.model])
        recognizer = PlaceRecognizer(PlaceRecognizerConfig(bev=bev, rotations=cfg.rotations, device=cfg.device, model=cfg.model, weights=weights))
        self.model_id = _model_id(weights)
        database = DescriptorDatabase(DatabaseConfig(dim=recognizer.descriptor_dim, max_size=cfg.max_keyframes))
        keypoints = KeyframeStore(KeyframeStoreConfig(max_in_memory=cfg.bev_in_memory, spill_dir=cfg.spill_dir))
        self.detector = LoopDetector(detection, recognizer, database, keypoints)

    @property
    def size(self) -> int:
        return len(self.detector.database)

    def add_keyframe(self, stamp: float, points: np.ndarray, odom_pose: np.ndarray, bev: np.ndarray | None = None,
                     detection: LoopDetectorConfig | None = None) -> DetectedKeyframe:
        return self.detector.add_keyframe(stamp, points, odom_pose, bev, detection)

    def add_undescribed(self, odom_pose: np.ndarray) -> int:
        return self.detector.add_undescribed(odom_pose)

    def save(self, path: str | Path) -> Path:
        d = self.detector
        keys = sorted(d.positions)
        keypoints = d.keypoints.to_arrays()
        return save_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, {
            "model_id": np.array(self.model_id),
            "database": np.frombuffer(d.database.to_bytes(), dtype=np.uint8),
            "position_keys": np.array(keys, dtype=np.int64),
            "positions": np.array([d.positions[k] for k in keys], dtype=float).reshape(-1, 3),
            **{f"keypoint_{name}": array for name, array in keypoints.items()},
        })

    def load(self, path: str | Path) -> None:
        """Replace the map with a saved one; on any error nothing changes."""
        fields = ("model_id", "database", "position_keys", "positions", "keypoint_keys", "keypoint_offsets", "keypoint_data")
        try:
            saved = load_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, fields, PlaceMapError)
        except PlaceMapError as err:
            if "format version 1," in str(err):
                raise PlaceMapError(f"{err}: version 1 maps hold BEV images, this release keeps BEV keypoints instead; "
                                    "replay the drive to rebuild the map") from None
            raise
        if str(saved["model_id"]) != self.model_id:
            raise PlaceMapError(f"{path}: made with model {saved['model_id']}, this node runs {self.model_id}")
        try:
            database = DescriptorDatabase.from_bytes(saved["database"].tobytes(), str(path), self.detector.recognizer.descriptor_dim)
        except DatabaseError as err:
            raise PlaceMapError(str(err)) from None
        data = saved["keypoint_data"]
        if len(saved["keypoint_keys"]) and (data.dtype != np.float16 or data.ndim != 2 or data.shape[1] < 3):
            raise PlaceMapError(f"{path}: keypoints must be (K, 2 + C) float16, got {data.dtype} {data.shape}")
        d = self.detector
        try:
            d.keypoints.from_arrays(saved["keypoint_keys"], saved["keypoint_offsets"], data, str(path))  # checks before replacing
        except KeyframeStoreError as err:
            raise PlaceMapError(str(err)) from None
        d.database = database
        d.positions = {int(k): p for k, p in zip(saved["position_keys"], saved["positions"])}
        d.session = database.next_session()  # new keyframes are a new run, relocalising against all saved ones


def _model_id(weights: str) -> str:
    """Weights file digest, so descriptors of different models are never compared."""
    if weights == RANDOM_WEIGHTS:
        return "untrained-seed0"
    return "sha256:" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
