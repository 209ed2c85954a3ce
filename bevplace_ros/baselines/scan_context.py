"""Scan Context (Kim & Kim, IROS 2018): polar max-height grid, ring-key retrieval, sector-key
alignment, column-shifted cosine distance. Vectorised over candidates and shifts.

For data sets that hold only BEV images, `scan_context_from_bev` builds it from the occupied
cells (cell centre = point, cell value = "height"): a stand-in, weaker than the raw-cloud version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.bev import BEVConfig
from bevplace_ros.evaluation.place_metrics import (
    LoopMatches,
    descriptor_top_k,
    earlier_mask,
)


@dataclass(frozen=True)
class ScanContextConfig:
    rings: int = 20
    sectors: int = 60
    max_range_m: float = 80.0
    lidar_height_m: float = 2.0  # added to z so ground-level returns count as positive heights
    candidates: int = 10  # ring-key neighbours re-ranked by the full distance
    search_ratio: float = 0.1  # fraction of sectors searched around the sector-key alignment

    def __post_init__(self) -> None:
        for name in ("rings", "sectors", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScanContextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_range_m > 0:
            raise ValueError(f"ScanContextConfig.max_range_m must be > 0, got {self.max_range_m}")
        if not 0 <= self.search_ratio <= 1:
            raise ValueError(f"ScanContextConfig.search_ratio must be in [0, 1], got {self.search_ratio}")

    @property
    def search_radius(self) -> int:
        return round(0.5 * self.search_ratio * self.sectors)


def _polar_max(xy: np.ndarray, height: np.ndarray, cfg: ScanContextConfig) -> np.ndarray:
    r = np.hypot(xy[:, 0], xy[:, 1])
    keep = (r > 0) & (r < cfg.max_range_m) & (height > 0)
    ring = np.minimum((r[keep] / cfg.max_range_m * cfg.rings).astype(np.int64), cfg.rings - 1)
    angle = np.arctan2(xy[keep, 1], xy[keep, 0]) + np.pi
    sector = np.minimum((angle / (2 * np.pi) * cfg.sectors).astype(np.int64), cfg.sectors - 1)
    desc = np.zeros(cfg.rings * cfg.sectors, dtype=np.float64)
    np.maximum.at(desc, ring * cfg.sectors + sector, height[keep])
    return desc.reshape(cfg.rings, cfg.sectors).astype(np.float32)


def scan_context(points: np.ndarray, cfg: ScanContextConfig = ScanContextConfig()) -> np.ndarray:
    """(rings, sectors) max height above the assumed ground of a raw scan (N, >=3)."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] < 3:
        raise ValueError(f"points must be an (N, >=3) array, got shape {pts.shape}")
    pts = pts[np.isfinite(pts[:, :3]).all(axis=1)]
    return _polar_max(pts[:, :2], pts[:, 2] + cfg.lidar_height_m, cfg)


def scan_context_from_bev(image: np.ndarray, bev: BEVConfig = BEVConfig(), cfg: ScanContextConfig = ScanContextConfig(max_range_m=30.0)) -> np.ndarray:
    """Scan Context of a BEV density image: occupied cells as points, density as height."""
    rows, cols = np.nonzero(image)
    return _polar_max(bev.pixel_to_xy(rows, cols), np.asarray(image, dtype=np.float64)[rows, cols], cfg)


def ring_keys(descs: np.ndarray) -> np.ndarray:
    """Rotation-invariant (N, rings) summary used for the candidate search."""
    return descs.mean(axis=-1)


def sc_distance(query: np.ndarray, candidates: np.ndarray, cfg: ScanContextConfig) -> np.ndarray:
    """(C,) distance 1 - mean column cosine at the best shift near the sector-key alignment."""
    s = cfg.sectors
    q_key, c_key = query.mean(axis=0), candidates.mean(axis=1)  # sector keys (S,), (C, S)
    roll = (np.arange(s)[None, :] - np.arange(s)[:, None]) % s  # roll[k] = columns shifted by k
    key_err = np.linalg.norm(c_key[:, roll] - q_key[None, None, :], axis=2)  # (C, S shifts)
    shifts = (key_err.argmin(axis=1)[:, None] + np.arange(-cfg.search_radius, cfg.search_radius + 1)[None, :]) % s  # (C, K)
    shifted = candidates[np.arange(len(candidates))[:, None, None, None], np.arange(cfg.rings)[None, None, :, None], roll[shifts][:, :, None, :]]  # (C, K, R, S)
    q_norm = np.linalg.norm(query, axis=0)  # (S,)
    c_norm = np.linalg.norm(shifted, axis=2)  # (C, K, S)
    valid = (q_norm[None, None, :] > 0) & (c_norm > 0)
    cos = np.einsum("rs,ckrs->cks", query, shifted) / np.where(valid, q_norm[None, None, :] * c_norm, 1.0)
    count = valid.sum(axis=2)
    dist = np.where(count > 0, 1.0 - np.where(valid, cos, 0.0).sum(axis=2) / np.maximum(count, 1), 1.0)
    return dist.min(axis=1)


def sc_top_k(database: np.ndarray, queries: np.ndarray, k: int, cfg: ScanContextConfig = ScanContextConfig()) -> np.ndarray:
    """(Q, k) database rows ranked by Scan Context distance among the ring-key candidates."""
    width = min(max(cfg.candidates, k), len(database))
    shortlist = descriptor_top_k(ring_keys(database), ring_keys(queries), width)
    ranked = np.empty((len(queries), min(k, width)), dtype=np.int64)
    for row, (query, rows) in enumerate(zip(queries, shortlist)):
        ranked[row] = rows[np.argsort(sc_distance(query, database[rows], cfg), kind="stable")[: ranked.shape[1]]]
    return ranked


def sc_loop_matches(descs: np.ndarray, exclude_recent: int, cfg: ScanContextConfig = ScanContextConfig()) -> LoopMatches:
    """Best older match of every frame: ring-key shortlist among allowed frames, then sc_distance."""
    n = len(descs)
    keys = ring_keys(descs).astype(np.float64)
    sq = (keys * keys).sum(axis=1)
    key_dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * keys @ keys.T, 0.0))
    key_dist = np.where(earlier_mask(n, exclude_recent), key_dist, np.inf)
    match = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, np.inf)
    width = min(cfg.candidates, n)
    for i in np.flatnonzero(np.isfinite(key_dist).any(axis=1)):
        rows = np.argpartition(key_dist[i], width - 1)[:width]
        rows = rows[np.isfinite(key_dist[i, rows])]
        d = sc_distance(descs[i], descs[rows], cfg)
        best = int(np.argmin(d))
        match[i], distance[i] = rows[best], d[best]
    return LoopMatches(match, distance)
