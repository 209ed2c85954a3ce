"""Loop verification: keep keyframe clouds (bounded) and register each candidate pair.

Registration gives T_match_query (query points into the match frame). The BEV 3-DoF guess is a
prior the registrar may use, never a requirement.

A registration that passes the registrar's own checks (fitness, inliers) must also pass a second,
independent geometric check, because one global score is easy to fool: a long wall or the ground
alone can give a wrong alignment a high fitness. (1) Region overlap: the aligned query cloud is cut
into azimuth sectors around the sensor and most populated sectors must overlap the match cloud on
their own. (2) BEV agreement: when the BEV 3-DoF guess (image features, other data than the 3-D
point matches) has enough inliers, the registration must agree with it in x, y and yaw.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
from scipy.spatial import cKDTree

from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig
from bevplace_ros.registration import Registrar, RegistrationConfig, RegistrationInputError, RegistrationResult
from bevplace_ros.registration.registrar import rejected
from bevplace_ros.se3 import invert, matrix_to_xyyaw, transform_points


@dataclass(frozen=True)
class LoopVerifierConfig:
    use_bev_prior: bool = True  # hand the BEV 3-DoF guess to the registrar when it is trustworthy
    min_bev_inliers: int = 8  # BEV RANSAC inliers for the guess to count as trustworthy
    # Prepared clouds (voxelised, normals, features) are kept up to this many MiB, so a keyframe is featurised once,
    # not once per candidate: ~4-5 MiB each for a KITTI scan on the classical paths, ~22 MiB with the network.
    prepared_cache_mib: float = 256.0
    region_sectors: int = 8  # azimuth sectors of the region overlap check
    region_radius: float = 40.0  # [m] only query points this close to the sensor count (far ones see other things)
    region_distance: float = 0.5  # [m] a query point overlaps when a match point is this close after alignment
    min_region_fitness: float = 0.2  # a sector overlaps when this share of its points do
    min_region_share: float = 0.6  # share of populated sectors that must overlap; 0 disables the check
    bev_max_translation: float = 3.0  # [m] registration-vs-BEV-guess disagreement allowed (x, y)
    bev_max_yaw_deg: float = 10.0  # [deg]; the BEV check runs only when the guess has min_bev_inliers

    def __post_init__(self) -> None:
        if self.min_bev_inliers < 0 or self.region_sectors < 1:
            raise ValueError("min_bev_inliers must be >= 0 and region_sectors >= 1")
        for name in ("prepared_cache_mib", "region_radius", "region_distance", "bev_max_translation", "bev_max_yaw_deg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LoopVerifierConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_region_fitness", "min_region_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"LoopVerifierConfig.{name} must be in [0, 1], got {getattr(self, name)}")


class UnknownKeyframe(KeyError):
    """The keyframe's cloud was never received or has been dropped from the bounded store."""


class LoopVerifier:
    def __init__(self, cfg: LoopVerifierConfig, registration: RegistrationConfig, store: KeyframeStoreConfig) -> None:
        self.cfg = cfg
        self.registrar = Registrar(registration)
        self.clouds = KeyframeStore(store)
        self._prepared: OrderedDict[int, object] = OrderedDict()
        self._prepared_bytes: dict[int, int] = {}

    def add_keyframe(self, key: int, points: np.ndarray) -> None:
        self.clouds.put(key, np.asarray(points[:, :3], dtype=np.float32))

    def verify(self, query_id: int, match_id: int, bev_guess: np.ndarray | None = None, bev_inliers: int = 0) -> RegistrationResult:
        """Register query onto match, then the second check; raises UnknownKeyframe when a cloud is not stored.

        A cloud the registrar cannot use (too few points, NaNs only, collinear, coplanar) gives a rejected result
        naming why, never an exception: one bad keyframe must not stop the node."""
        start = time.perf_counter()
        try:
            result = self.register(query_id, match_id, bev_guess, bev_inliers)
        except RegistrationInputError as err:
            return rejected(f"bad input: {err}", {"total": (time.perf_counter() - start) * 1e3})
        if not result.verified:
            return result
        reason = self.second_check(result.transform, query_id, match_id, bev_guess, bev_inliers)
        return replace(result, verified=False, reason=reason) if reason else result

    def register(self, query_id: int, match_id: int, bev_guess: np.ndarray | None = None, bev_inliers: int = 0) -> RegistrationResult:
        """The registrar's result alone (its own fitness/inlier verdict, no second check)."""
        guess = bev_guess if self.cfg.use_bev_prior and bev_inliers >= self.cfg.min_bev_inliers else None
        return self.registrar.register_prepared(self.prepare(query_id), self.prepare(match_id), guess)

    def second_check(self, T_match_query: np.ndarray, query_id: int, match_id: int, bev_guess: np.ndarray | None = None,
                     bev_inliers: int = 0) -> str:
        """Why the alignment fails the region-overlap or BEV-agreement check; empty when it passes."""
        if bev_guess is not None and bev_inliers >= self.cfg.min_bev_inliers:
            x, y, yaw = matrix_to_xyyaw(invert(bev_guess) @ T_match_query)
            d_yaw = abs(np.degrees(yaw))
            if np.hypot(x, y) > self.cfg.bev_max_translation or d_yaw > self.cfg.bev_max_yaw_deg:
                return (f"BEV disagreement: registration differs from the BEV guess ({bev_inliers} inliers) by "
                        f"{np.hypot(x, y):.2f} m / {d_yaw:.1f} deg (caps {self.cfg.bev_max_translation} m / {self.cfg.bev_max_yaw_deg} deg)")
        if self.cfg.min_region_share == 0:
            return ""
        overlapping, populated = self._region_overlap(T_match_query, self.prepare(query_id), self.prepare(match_id))
        if populated and overlapping < self.cfg.min_region_share * populated:
            return (f"region overlap: only {overlapping} of {populated} sectors overlap after alignment "
                    f"(need {self.cfg.min_region_share:.0%} with fitness >= {self.cfg.min_region_fitness})")
        return ""

    def _region_overlap(self, T_match_query: np.ndarray, query, match) -> tuple[int, int]:
        """(overlapping, populated) azimuth sectors of the query cloud near the sensor."""
        points = np.asarray(query.gicp_points, dtype=float)
        points = points[np.hypot(points[:, 0], points[:, 1]) <= self.cfg.region_radius]
        if len(points) == 0:
            return 0, 0
        dist, _ = match.features["region_tree"].query(transform_points(T_match_query, points),
                                                      distance_upper_bound=self.cfg.region_distance)
        n = self.cfg.region_sectors
        sector = np.minimum(((np.arctan2(points[:, 1], points[:, 0]) + np.pi) / (2 * np.pi) * n).astype(int), n - 1)
        total = np.bincount(sector, minlength=n)
        hits = np.bincount(sector, weights=np.isfinite(dist), minlength=n)
        populated = total >= max(10, len(points) // (4 * n))  # a sector with a handful of points says nothing
        return int(np.sum(hits[populated] >= self.cfg.min_region_fitness * total[populated])), int(populated.sum())

    def prepare(self, key: int):
        """The keyframe's prepared cloud, from the bounded cache or prepared now (once per keyframe)."""
        if key in self._prepared:
            self._prepared.move_to_end(key)
            return self._prepared[key]
        points = self.clouds.get(key)
        if points is None:
            raise UnknownKeyframe(f"no cloud stored for keyframe {key} (never received, or dropped by the store bound)")
        prepared = self.registrar.preprocess(points, f"keyframe {key}")
        start = time.perf_counter()  # the region check's k-d tree, once per keyframe instead of once per candidate
        prepared.features["region_tree"] = cKDTree(np.asarray(prepared.gicp_points, dtype=float))
        prepared.timings["region_tree"] = (time.perf_counter() - start) * 1e3
        self._prepared[key] = prepared
        self._prepared_bytes[key] = prepared.nbytes()
        while len(self._prepared) > 2 and sum(self._prepared_bytes.values()) > self.cfg.prepared_cache_mib * 2**20:
            oldest, _ = self._prepared.popitem(last=False)  # the query and its match always stay
            del self._prepared_bytes[oldest]
        return prepared

    def prepared_cache_bytes(self) -> tuple[int, int]:
        """(clouds, bytes) held by the prepared-cloud cache."""
        return len(self._prepared), sum(self._prepared_bytes.values())

    def save(self, path: str) -> int:
        self.clouds.save(path)
        return len(self.clouds)

    def load(self, path: str) -> int:
        """Replace the stored clouds with a saved set; raises KeyframeStoreError and keeps them on failure."""
        count = self.clouds.load(path)
        self._prepared.clear()
        self._prepared_bytes.clear()
        return count
