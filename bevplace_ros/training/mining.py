"""Which frames are the same place: positives within pos_radius_m, negatives beyond neg_radius_m
(or in another sequence, i.e. another world), and hard negatives picked from a descriptor cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MiningConfig:
    pos_radius_m: float = 5.0
    neg_radius_m: float = 25.0
    negatives: int = 4  # hard negatives per training tuple
    queries_per_epoch: int = 256
    pool_size: int = 600  # random negative candidates encoded into the descriptor cache each epoch

    def __post_init__(self) -> None:
        if not 0 < self.pos_radius_m < self.neg_radius_m:
            raise ValueError(f"MiningConfig needs 0 < pos_radius_m < neg_radius_m, got {self.pos_radius_m} and {self.neg_radius_m}")
        for name in ("negatives", "queries_per_epoch", "pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"MiningConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_size < self.negatives:
            raise ValueError(f"MiningConfig.pool_size ({self.pool_size}) must be >= negatives ({self.negatives})")


@dataclass(frozen=True)
class Tuple:
    query: int
    positive: int
    negatives: np.ndarray  # (negatives,) hardest first
    other: int  # a negative of both query and negatives[0]: the quadruplet loss's fourth frame


class PlaceGraph:
    """Ground-truth neighbourhoods over frames of several sequences (positions are per sequence)."""

    def __init__(self, positions: np.ndarray, sequence_ids: np.ndarray, cfg: MiningConfig) -> None:
        from scipy.spatial import cKDTree

        self.positions = np.asarray(positions, dtype=np.float64)
        self.sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
        self.cfg = cfg
        self._positives: list[np.ndarray] = [np.zeros(0, np.int64)] * len(self.positions)
        for seq in np.unique(self.sequence_ids):
            members = np.flatnonzero(self.sequence_ids == seq)
            tree = cKDTree(self.positions[members])
            for row, near in zip(members, tree.query_ball_point(self.positions[members], cfg.pos_radius_m)):
                found = members[np.asarray(near, dtype=np.int64)]
                self._positives[row] = found[found != row]
        self.has_positive = np.array([len(p) > 0 for p in self._positives])
        if not self.has_positive.any():
            raise ValueError(f"no frame has another frame within pos_radius_m={cfg.pos_radius_m} m; nothing to train on")

    def __len__(self) -> int:
        return len(self.positions)

    def positives(self, frame: int) -> np.ndarray:
        return self._positives[frame]

    def negative_mask(self, frames: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(len(frames), len(candidates)) True where the candidate is a negative of the frame."""
        same = self.sequence_ids[frames][:, None] == self.sequence_ids[candidates][None, :]
        dist = np.linalg.norm(self.positions[frames][:, None, :] - self.positions[candidates][None, :, :], axis=2)
        return ~same | (dist > self.cfg.neg_radius_m)


def sample_epoch(graph: PlaceGraph, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(queries, negative pool) of one epoch: the frames whose descriptors the cache needs."""
    cfg = graph.cfg
    eligible = np.flatnonzero(graph.has_positive)
    queries = rng.choice(eligible, size=min(cfg.queries_per_epoch, len(eligible)), replace=False)
    pool = rng.choice(len(graph), size=min(cfg.pool_size, len(graph)), replace=False)
    return queries, pool


def mine_tuples(graph: PlaceGraph, queries: np.ndarray, pool: np.ndarray, query_desc: np.ndarray, pool_desc: np.ndarray, rng: np.random.Generator) -> list[Tuple]:
    """Random true positive (exact ground truth makes every one valid, and random ones vary the
    viewpoint more than the nearest), the cache's closest negatives, and a fourth frame."""
    cfg = graph.cfg
    squared = (query_desc**2).sum(1)[:, None] + (pool_desc**2).sum(1)[None, :] - 2.0 * query_desc @ pool_desc.T
    dist = np.sqrt(np.maximum(squared, 0.0))  # not via (Q, P, D) differences: 1000 x 2000 x 8192 floats is 61 GiB
    negative = graph.negative_mask(queries, pool)
    dist = np.where(negative, dist, np.inf)
    tuples = []
    for row, query in enumerate(queries):
        count = int(negative[row].sum())
        if count < cfg.negatives:
            continue
        hardest = pool[np.argsort(dist[row], kind="stable")[: cfg.negatives]]
        others = pool[negative[row] & graph.negative_mask(hardest[:1], pool)[0]]
        if not len(others):
            continue
        tuples.append(Tuple(int(query), int(rng.choice(graph.positives(query))), hardest, int(rng.choice(others))))
    return tuples
