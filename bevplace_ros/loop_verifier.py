"""Loop verification: keep keyframe clouds (bounded) and register each candidate pair.

Registration gives T_match_query (query points into the match frame). The BEV 3-DoF guess is a
prior the registrar may use, never a requirement.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from bevplace_ros.keyframe_store import KeyframeStore, KeyframeStoreConfig
from bevplace_ros.registration import Registrar, RegistrationConfig, RegistrationResult


@dataclass(frozen=True)
class LoopVerifierConfig:
    use_bev_prior: bool = True  # hand the BEV 3-DoF guess to the registrar when it is trustworthy
    min_bev_inliers: int = 8  # BEV RANSAC inliers for the guess to count as trustworthy
    prepared_cache: int = 8  # prepared clouds kept (a query is usually checked against several matches)

    def __post_init__(self) -> None:
        if self.min_bev_inliers < 0 or self.prepared_cache < 1:
            raise ValueError("min_bev_inliers must be >= 0 and prepared_cache >= 1")


class UnknownKeyframe(KeyError):
    """The keyframe's cloud was never received or has been dropped from the bounded store."""


class LoopVerifier:
    def __init__(self, cfg: LoopVerifierConfig, registration: RegistrationConfig, store: KeyframeStoreConfig) -> None:
        self.cfg = cfg
        self.registrar = Registrar(registration)
        self.clouds = KeyframeStore(store)
        self._prepared: OrderedDict[int, object] = OrderedDict()

    def add_keyframe(self, key: int, points: np.ndarray) -> None:
        self.clouds.put(key, np.asarray(points[:, :3], dtype=np.float32))

    def verify(self, query_id: int, match_id: int, bev_guess: np.ndarray | None = None, bev_inliers: int = 0) -> RegistrationResult:
        """Register query onto match; raises UnknownKeyframe when either cloud is not stored."""
        guess = bev_guess if self.cfg.use_bev_prior and bev_inliers >= self.cfg.min_bev_inliers else None
        return self.registrar.register_prepared(self._prepare(query_id), self._prepare(match_id), guess)

    def _prepare(self, key: int):
        if key in self._prepared:
            self._prepared.move_to_end(key)
            return self._prepared[key]
        points = self.clouds.get(key)
        if points is None:
            raise UnknownKeyframe(f"no cloud stored for keyframe {key} (never received, or dropped by the store bound)")
        prepared = self.registrar.preprocess(points, f"keyframe {key}")
        self._prepared[key] = prepared
        while len(self._prepared) > self.cfg.prepared_cache:
            self._prepared.popitem(last=False)
        return prepared

    def save(self, path: str) -> int:
        self.clouds.save(path)
        return len(self.clouds)

    def load(self, path: str) -> int:
        """Replace the stored clouds with a saved set; raises KeyframeStoreError and keeps them on failure."""
        count = self.clouds.load(path)
        self._prepared.clear()
        return count
