"""Place-recognition metrics that any retrieval method plugs into (learned descriptors, Scan Context).

Two protocols:
- split recall (BEVPlace KITTI): database = an earlier part, queries = a later part; a query with
  a database frame within `radius_m` counts, and is right when its top-1 (top-1 %) match is one.
- loop detection over a whole sequence: frame i may match any frame older than i - exclude_recent;
  a detection is its top-1 match with a distance under a threshold; sweeping the threshold gives
  the precision-recall curve and F1max. Revisit frames are split by heading difference to their
  nearest earlier positive (same direction < 90 deg, reverse otherwise); frames that revisit
  nothing stay in both splits, so false alarms count against both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from bevplace_ros.bev_pose import BEVKeypoints, BEVPoseConfig
    from bevplace_ros.loop_detector import LoopDetectorConfig

DIRECTIONS = ("same", "reverse")


@dataclass(frozen=True)
class SplitRecall:
    recall_at_1: float  # percent
    recall_at_1pct: float  # percent, top max(1, round(1 % of the database)) matches
    queries: int  # queries with a true match in the database
    top1: np.ndarray  # (queries,) database index of each counted query's top-1
    correct: np.ndarray  # (queries,) bool
    query_rows: np.ndarray  # (queries,) which query rows were counted


@dataclass(frozen=True)
class LoopMatches:
    """Top-1 earlier match of every frame (-1 / inf where none is allowed yet)."""

    match: np.ndarray  # (N,) int64
    distance: np.ndarray  # (N,) float64


@dataclass(frozen=True)
class PRCurve:
    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    f1_max: float | None  # None where the split has no revisits
    threshold_at_f1_max: float | None
    revisits: int


def top_percent_k(database_size: int) -> int:
    return max(1, round(0.01 * database_size))


def descriptor_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) database rows nearest to each query in L2 (exact faiss search), and their L2 distances."""
    import faiss

    index = faiss.IndexFlatL2(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    d2, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(database)))
    return rows, np.sqrt(np.maximum(d2, 0.0))


def descriptor_top_k(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) database rows nearest to each query in L2."""
    return descriptor_search(database, queries, k)[0]


def split_recall(top_k: np.ndarray, db_positions: np.ndarray, query_positions: np.ndarray, radius_m: float = 5.0) -> SplitRecall:
    """Recall@1 and Recall@1% from ranked database rows (Q, >= top_percent_k(len(db)))."""
    k_pct = top_percent_k(len(db_positions))
    if top_k.shape[1] < k_pct:
        raise ValueError(f"need the top {k_pct} matches per query for Recall@1%, got {top_k.shape[1]}")
    from scipy.spatial import cKDTree

    has_match = np.array([len(n) > 0 for n in cKDTree(db_positions).query_ball_point(query_positions, radius_m)], dtype=bool)
    rows = np.flatnonzero(has_match)
    if not len(rows):
        raise ValueError(f"no query has a database frame within {radius_m} m; nothing to evaluate")
    ranked = top_k[rows, :k_pct]
    hit = np.linalg.norm(db_positions[ranked] - query_positions[rows, None, :], axis=2) <= radius_m
    return SplitRecall(100.0 * hit[:, 0].mean(), 100.0 * hit.any(axis=1).mean(), len(rows), ranked[:, 0], hit[:, 0], rows)


def earlier_mask(n: int, exclude_recent: int) -> np.ndarray:
    """(n, n) True where column j may be a loop match of row i: j < i - exclude_recent."""
    i = np.arange(n)
    return i[None, :] < (i[:, None] - exclude_recent)


def descriptor_loop_top_k(descriptors: np.ndarray, exclude_recent: int, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) nearest older frames of every frame, nearest first (-1 / inf where fewer are allowed),
    and their L2 distances; chunked so N x N distances never sit in memory at once."""
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    n = len(x)
    k = min(k, n)
    sq = (x * x).sum(axis=1)
    match = np.full((n, k), -1, dtype=np.int64)
    distance = np.full((n, k), np.inf)
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        d2 = sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.T)
        d2 = np.where(np.arange(n)[None, :] < (rows[:, None] - exclude_recent), d2, np.inf)
        best = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(rows), 1))
        best = np.take_along_axis(best, np.argsort(np.take_along_axis(d2, best, axis=1), axis=1, kind="stable"), axis=1)
        d = np.take_along_axis(d2, best, axis=1)
        ok = np.isfinite(d)
        match[rows] = np.where(ok, best, -1)
        distance[rows] = np.where(ok, np.sqrt(np.maximum(d, 0.0)), np.inf)
    return match, distance


def descriptor_loop_matches(descriptors: np.ndarray, exclude_recent: int, chunk: int = 1024) -> LoopMatches:
    """Nearest older descriptor of every frame."""
    match, distance = descriptor_loop_top_k(descriptors, exclude_recent, 1, chunk)
    return LoopMatches(match[:, 0], distance[:, 0])


def rerank_rows(rows: np.ndarray, distances: np.ndarray, query_keypoints: Sequence[BEVKeypoints], keypoints: Sequence[BEVKeypoints],
                cfg: LoopDetectorConfig, pose_cfg: BEVPoseConfig) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's re-ranking applied offline: (rows with the first cfg.rerank_k of each query
    re-ordered by BEV geometry, (Q,) re-ranking score of the new top-1; -inf without candidates).

    Nothing is rejected here: the score is what a rejection threshold (cfg.min_inliers) cuts, and
    what the PR curve sweeps. `keypoints[r]` belongs to row r of `rows`' index space.
    """
    from dataclasses import replace

    from bevplace_ros.loop_detector import rerank, rerank_score

    out = rows.copy()
    score = np.full(len(rows), -np.inf)
    keep_all = replace(cfg, min_inliers=0)
    for q, (cand, dist) in enumerate(zip(rows[:, : cfg.rerank_k], distances[:, : cfg.rerank_k])):
        cand, dist = cand[cand >= 0], dist[cand >= 0]
        if not len(cand):
            continue
        order, poses = rerank(query_keypoints[q], [keypoints[r] for r in cand], dist, keep_all, pose_cfg)
        out[q, : len(cand)] = cand[order]
        best = poses[order[0]]
        score[q] = rerank_score(np.array(0 if best is None else best.inliers), dist[order[0]])
    return out, score


def reranked_loop_matches(rows: np.ndarray, distances: np.ndarray, keypoints: Sequence[BEVKeypoints], cfg: LoopDetectorConfig,
                          pose_cfg: BEVPoseConfig) -> LoopMatches:
    """Loop detection with re-ranking: each frame's best older match by geometry; its 'distance' is
    minus the re-ranking score, so the PR sweep over it is a sweep over the inlier threshold."""
    ranked, score = rerank_rows(rows, distances, keypoints, keypoints, cfg, pose_cfg)
    return LoopMatches(np.where(np.isfinite(score), ranked[:, 0], -1), -score)


def revisit_directions(positions: np.ndarray, headings: np.ndarray, exclude_recent: int, radius_m: float = 5.0) -> np.ndarray:
    """(N,) '' for frames with no older frame within radius_m, else 'same' or 'reverse'."""
    from scipy.spatial import cKDTree

    tree = cKDTree(positions)
    out = np.full(len(positions), "", dtype=object)
    for i, near in enumerate(tree.query_ball_point(positions, radius_m)):
        older = np.asarray([j for j in near if j < i - exclude_recent], dtype=np.int64)
        if len(older):
            nearest = older[np.argmin(np.linalg.norm(positions[older] - positions[i], axis=1))]
            turn = np.angle(np.exp(1j * (headings[i] - headings[nearest])))
            out[i] = "same" if abs(turn) < np.pi / 2 else "reverse"
    return out


def loop_correct(matches: LoopMatches, positions: np.ndarray, radius_m: float = 5.0) -> np.ndarray:
    """(N,) True where the frame's top-1 older match lies within radius_m."""
    ok = matches.match >= 0
    correct = np.zeros(len(positions), dtype=bool)
    correct[ok] = np.linalg.norm(positions[matches.match[ok]] - positions[ok], axis=1) <= radius_m
    return correct


def loop_recall_at_1(matches: LoopMatches, positions: np.ndarray, directions: np.ndarray, radius_m: float = 5.0) -> float | None:
    """Percent of revisit frames whose top-1 older match is a true one (threshold-free); None without revisits."""
    revisit = directions != ""
    if not revisit.any():
        return None
    return float(100.0 * loop_correct(matches, positions, radius_m)[revisit].mean())


def pr_curve(matches: LoopMatches, correct: np.ndarray, directions: np.ndarray, direction: str | None = None) -> PRCurve:
    """Precision/recall over all distance thresholds for one revisit split (None: every revisit)."""
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS} or None, got {direction!r}")
    wanted = directions != "" if direction is None else directions == direction
    scope = (matches.match >= 0) & ((directions == "") | wanted)
    revisits = int(wanted.sum())
    if revisits == 0:
        return PRCurve(np.zeros(0), np.zeros(0), np.zeros(0), None, None, 0)
    order = np.argsort(matches.distance[scope], kind="stable")
    dist = matches.distance[scope][order]
    tp = np.cumsum((correct & wanted)[scope][order])
    detections = np.arange(1, len(dist) + 1)
    last = np.r_[dist[1:] != dist[:-1], True]  # one point per distinct threshold (ties decided together)
    precision, recall, thresholds = tp[last] / detections[last], tp[last] / revisits, dist[last]
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))
    return PRCurve(precision, recall, thresholds, float(f1[best]), float(thresholds[best]), revisits)
