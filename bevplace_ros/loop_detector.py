"""Place recognition over a growing map: describe a keyframe, retrieve earlier places, re-rank them
by BEV geometry, guess the pose.

BEV -> descriptor -> retrieve `rerank_k` places (excluding the recent past) -> BEV 3-DoF pose
against each -> keep the `top_k` with the most geometric inliers, none below `min_inliers`.
The network runs once per keyframe: each keyframe keeps its BEV keypoints (packed float16,
`BEVKeypoints.packed`) in the bounded keyframe store, so a later pose query against it is the
pose step alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bevplace_ros.bev_pose import BEVKeypoints, BEVPose, BEVPoseConfig, estimate_pose
from bevplace_ros.descriptor_db import DescriptorDatabase
from bevplace_ros.keyframe_store import KeyframeStore
from bevplace_ros.place_recognizer import PlaceFeatures, PlaceRecognizer


@dataclass(frozen=True)
class LoopDetectorConfig:
    top_k: int = 3  # candidates per keyframe (on the demo: 3 closes 26 of 42 revisits, 1 closes 15; no false loops either way)
    exclude_recent: int = 50  # most recent keyframes never returned (they are trivially similar)
    exclude_seconds: float = 10.0  # nor keyframes closer in time than this [s]
    max_descriptor_distance: float = 1.2  # L2 distance of normalised descriptors, in [0, 2]
    max_odom_distance: float = 0.0  # [m] skip candidates farther apart in odometry; 0 disables
    rerank_k: int = 10  # places retrieved and re-ranked by BEV geometric agreement; 0: descriptor order, no rejection
    min_inliers: int = 0  # re-ranking drops places whose BEV pose has fewer inliers than this; 0: none (registration verifies)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.exclude_recent < 0 or self.exclude_seconds < 0 or self.max_odom_distance < 0:
            raise ValueError("top_k must be >= 1; exclude_recent, exclude_seconds, max_odom_distance >= 0")
        if not 0.0 < self.max_descriptor_distance <= 2.0:
            raise ValueError(f"max_descriptor_distance must be in (0, 2], got {self.max_descriptor_distance}")
        if self.rerank_k < 0 or self.min_inliers < 0:
            raise ValueError(f"rerank_k and min_inliers must be >= 0, got {self.rerank_k}, {self.min_inliers}")

    @property
    def retrieved(self) -> int:
        """Places fetched from the database per keyframe."""
        return max(self.top_k, self.rerank_k)


@dataclass(frozen=True)
class Candidate:
    query_id: int
    match_id: int
    query_stamp: float
    match_stamp: float
    rank: int
    descriptor_distance: float
    odom_distance: float
    bev: BEVPose | None  # T_match_query guess; None when the poses disagree or the match's keypoints are no longer stored


@dataclass(frozen=True)
class DetectedKeyframe:
    id: int
    features: PlaceFeatures
    candidates: list[Candidate]


def rerank(query: BEVKeypoints, matches: Sequence[BEVKeypoints | None], distances: np.ndarray, cfg: LoopDetectorConfig,
           pose_cfg: BEVPoseConfig) -> tuple[np.ndarray, list[BEVPose | None]]:
    """(order, poses): indices of `matches` best first, and each match's T_match_query.

    With re-ranking on, the order is by inlier count (ties by descriptor distance) and drops matches
    under `min_inliers`; a match with no stored keypoints (None) cannot be scored and goes last, kept,
    since registration still verifies it. With it off (rerank_k 0), the order is the retrieval order.
    """
    poses = [None if m is None else estimate_pose(m, query, pose_cfg) for m in matches]
    if not cfg.rerank_k:
        return np.arange(len(matches)), poses
    inliers = np.array([0 if p is None else p.inliers for p in poses])
    unscored = np.array([m is None for m in matches], dtype=bool)
    score = np.where(unscored, -np.inf, rerank_score(inliers, np.asarray(distances)))
    order = np.argsort(-score, kind="stable")
    keep = (inliers >= cfg.min_inliers) | unscored
    return order[keep[order]], poses


def rerank_score(inliers: np.ndarray, descriptor_distance: np.ndarray) -> np.ndarray:
    """Geometric inliers first; the descriptor distance (in [0, 2]) only breaks ties."""
    return inliers - np.asarray(descriptor_distance) / 4.0


class LoopDetector:
    def __init__(self, cfg: LoopDetectorConfig, recognizer: PlaceRecognizer, database: DescriptorDatabase, keypoint_store: KeyframeStore) -> None:
        self.cfg = cfg
        self.recognizer = recognizer
        self.database = database
        self.keypoints = keypoint_store  # keyframe id -> BEVKeypoints.packed()
        self.positions: dict[int, np.ndarray] = {}  # odometry position per keyframe (24 bytes each)
        self.session = 0  # the run new keyframes belong to; recency exclusions apply within it only

    def next_id(self) -> int:
        return max(self.positions, default=-1) + 1

    def add_keyframe(self, stamp: float, points: np.ndarray, odom_pose: np.ndarray, bev: np.ndarray | None = None,
                     detection: LoopDetectorConfig | None = None) -> DetectedKeyframe:
        """Describe the scan (the keyframe's only network pass), find loop candidates among earlier keyframes, then store it.

        `bev`: the scan's BEV image where the caller made it already (the place node checks it first);
        `detection`: this keyframe's settings instead of `cfg` (the node sheds candidates and re-ranking when behind).
        """
        key = self.next_id()
        features = self.recognizer.describe(points) if bev is None else self.recognizer.describe_images(bev[None])[0]
        candidates = self._candidates(key, stamp, features, odom_pose[:3, 3], detection or self.cfg)
        self.database.add(key, stamp, features.descriptor, self.session)
        self.keypoints.put(key, features.keypoints.packed())
        self.positions[key] = np.asarray(odom_pose[:3, 3], dtype=float)
        return DetectedKeyframe(key, features, candidates)

    def add_undescribed(self, odom_pose: np.ndarray) -> int:
        """A keyframe whose network pass was shed under overload: an id and a position, no descriptor, so it is
        never a query nor a candidate, but the keyframe itself (its pose and cloud downstream) is kept."""
        key = self.next_id()
        self.positions[key] = np.asarray(odom_pose[:3, 3], dtype=float)
        return key

    def stored_keypoints(self, key: int) -> BEVKeypoints | None:
        packed = self.keypoints.get(key)
        return None if packed is None else BEVKeypoints.unpack(packed)

    def _candidates(self, key: int, stamp: float, features: PlaceFeatures, position: np.ndarray, cfg: LoopDetectorConfig) -> list[Candidate]:
        matches = self.database.query(features.descriptor, stamp, cfg.retrieved, cfg.exclude_recent, cfg.exclude_seconds, self.session)
        kept = []
        for match in matches:  # another session's odometry frame is unrelated: no distance (NaN), never filtered
            odom_distance = float(np.linalg.norm(self.positions[match.keyframe_id] - position)) if match.session == self.session else float("nan")
            if match.distance <= cfg.max_descriptor_distance and not (cfg.max_odom_distance and odom_distance > cfg.max_odom_distance):
                kept.append((match, odom_distance))
        kept = kept[: cfg.top_k] if not cfg.rerank_k else kept  # without re-ranking, pose only what is published
        distances = np.array([m.distance for m, _ in kept])
        order, poses = rerank(features.keypoints, [self.stored_keypoints(m.keyframe_id) for m, _ in kept], distances, cfg,
                              self.recognizer.cfg.pose)
        return [Candidate(key, kept[i][0].keyframe_id, stamp, kept[i][0].stamp, rank, float(distances[i]), kept[i][1], poses[i])
                for rank, i in enumerate(order[: cfg.top_k])]
