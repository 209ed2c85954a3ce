"""The place node's whole state: network, descriptor database, BEV images, keyframe positions.

Saved as one versioned, atomically written file so a map survives restarts (and a crash during a
save leaves the previous map loadable).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bevplace_ros.bev import BEVConfig
from bevplace_ros.descriptor_db import DatabaseConfig, DatabaseError, DescriptorDatabase
from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig
from bevplace_ros.loop_detector import DetectedKeyframe, LoopDetector, LoopDetectorConfig
from bevplace_ros.models.checkpoint import DEFAULT_WEIGHTS, EQUIVARIANT, RANDOM_WEIGHTS
from bevplace_ros.place_recognizer import PlaceRecognizer, PlaceRecognizerConfig
from bevplace_ros.versioned_npz import load_versioned_npz, save_versioned_npz

FORMAT_NAME = "bevplace_ros.place_map"
FORMAT_VERSION = 1


class PlaceMapError(ValueError):
    """A saved map that cannot be used: unreadable, foreign, or made by another model."""


@dataclass(frozen=True)
class PlaceMapConfig:
    weights: str = ""  # empty: the shipped weights of `model`; "random": untrained and seeded (baselines, tests)
    model: str = EQUIVARIANT  # "bevplace_equivariant" (the package's) or "bevplace_v1" (the BEVPlace authors' network)
    device: str = "auto"
    rotations: int = 8
    max_keyframes: int = 200_000  # descriptor database bound (oldest thinned beyond it)
    bev_in_memory: int = 2000  # BEV images (23 kB each) kept in RAM
    spill_dir: str = ""  # where older BEV images go; empty drops them (no BEV guess for very old matches)


class PlaceMap:
    def __init__(self, cfg: PlaceMapConfig, bev: BEVConfig, detection: LoopDetectorConfig) -> None:
        weights = cfg.weights or str(DEFAULT_WEIGHTS[cfg.model])
        recognizer = PlaceRecognizer(PlaceRecognizerConfig(bev=bev, rotations=cfg.rotations, device=cfg.device, model=cfg.model, weights=weights))
        self.model_id = _model_id(weights)
        database = DescriptorDatabase(DatabaseConfig(dim=recognizer.descriptor_dim, max_size=cfg.max_keyframes))
        bevs = KeyframeStore(KeyframeStoreConfig(max_in_memory=cfg.bev_in_memory, spill_dir=cfg.spill_dir))
        self.detector = LoopDetector(detection, recognizer, database, bevs)

    @property
    def size(self) -> int:
        return len(self.detector.database)

    def add_keyframe(self, stamp: float, points: np.ndarray, odom_pose: np.ndarray) -> DetectedKeyframe:
        return self.detector.add_keyframe(stamp, points, odom_pose)

    def save(self, path: str | Path) -> Path:
        d = self.detector
        keys = sorted(d.positions)
        bev_keys = d.bevs.keys()
        return save_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, {
            "model_id": np.array(self.model_id),
            "database": np.frombuffer(d.database.to_bytes(), dtype=np.uint8),
            "position_keys": np.array(keys, dtype=np.int64),
            "positions": np.array([d.positions[k] for k in keys], dtype=float).reshape(-1, 3),
            "bev_keys": np.array(bev_keys, dtype=np.int64),
            "bevs": np.array([d.bevs.get(k) for k in bev_keys], dtype=np.uint8).reshape(len(bev_keys), *_bev_shape(d)),
        })

    def load(self, path: str | Path) -> None:
        """Replace the map with a saved one; on any error nothing changes."""
        fields = ("model_id", "database", "position_keys", "positions", "bev_keys", "bevs")
        saved = load_versioned_npz(path, FORMAT_NAME, FORMAT_VERSION, fields, PlaceMapError)
        if str(saved["model_id"]) != self.model_id:
            raise PlaceMapError(f"{path}: made with model {saved['model_id']}, this node runs {self.model_id}")
        try:
            database = DescriptorDatabase.from_bytes(saved["database"].tobytes(), str(path), self.detector.recognizer.descriptor_dim)
        except DatabaseError as err:
            raise PlaceMapError(str(err)) from None
        if saved["bevs"].shape[1:] != _bev_shape(self.detector) or len(saved["bevs"]) != len(saved["bev_keys"]):
            raise PlaceMapError(f"{path}: BEV images of shape {saved['bevs'].shape[1:]} do not fit this node's BEV configuration")
        d = self.detector
        d.database = database
        d.positions = {int(k): p for k, p in zip(saved["position_keys"], saved["positions"])}
        d.session = database.next_session()  # new keyframes are a new run, relocalising against all saved ones
        d.bevs.clear()
        for key, image in zip(saved["bev_keys"], saved["bevs"]):
            d.bevs.put(int(key), image)


def _bev_shape(detector: LoopDetector) -> tuple[int, int]:
    size = detector.recognizer.cfg.bev.size
    return size, size


def _model_id(weights: str) -> str:
    """Weights file digest, so descriptors of different models are never compared."""
    if weights == RANDOM_WEIGHTS:
        return "untrained-seed0"
    return "sha256:" + hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
