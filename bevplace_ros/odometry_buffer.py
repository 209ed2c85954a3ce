"""Odometry poses looked up at a scan's stamp: LiDAR and odometry never arrive in lockstep."""

from __future__ import annotations

import bisect
from collections import deque

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from bevplace_ros.se3 import make_transform


class OdometryLookupError(LookupError):
    """No odometry close enough to the requested stamp."""


class OdometryBuffer:
    """A bounded, stamp-ordered history of odometry poses with interpolation."""

    def __init__(self, max_length: int = 2000, max_gap: float = 0.5) -> None:
        self.max_gap = max_gap  # [s] largest stamp distance we interpolate or extrapolate across
        self._stamps: deque[float] = deque(maxlen=max_length)
        self._poses: deque[np.ndarray] = deque(maxlen=max_length)

    def __len__(self) -> int:
        return len(self._stamps)

    def add(self, stamp: float, pose: np.ndarray) -> None:
        """Append a pose; out-of-order or duplicated stamps are refused with ValueError."""
        if not np.all(np.isfinite(pose)):
            raise ValueError("odometry pose contains NaN or inf")
        if self._stamps and stamp <= self._stamps[-1]:
            raise ValueError(f"odometry stamp {stamp:.6f} is not after the previous one {self._stamps[-1]:.6f}")
        self._stamps.append(stamp)
        self._poses.append(pose)

    def clear(self) -> None:
        self._stamps.clear()
        self._poses.clear()

    def lookup(self, stamp: float) -> np.ndarray:
        """Pose at `stamp`: interpolated between neighbours, or the nearest one within max_gap."""
        if not self._stamps:
            raise OdometryLookupError("no odometry received yet")
        stamps = list(self._stamps)
        i = bisect.bisect_left(stamps, stamp)
        if 0 < i < len(stamps) and stamps[i] - stamps[i - 1] <= 2 * self.max_gap:
            return self._interpolate(i - 1, i, stamp)
        nearest = min((j for j in (i - 1, i) if 0 <= j < len(stamps)), key=lambda j: abs(stamps[j] - stamp))
        if abs(stamps[nearest] - stamp) > self.max_gap:
            raise OdometryLookupError(
                f"no odometry within {self.max_gap:.2f} s of stamp {stamp:.3f} "
                f"(have {stamps[0]:.3f} .. {stamps[-1]:.3f})"
            )
        return self._poses[nearest]

    def _interpolate(self, a: int, b: int, stamp: float) -> np.ndarray:
        ta, tb = self._stamps[a], self._stamps[b]
        Ta, Tb = self._poses[a], self._poses[b]
        w = (stamp - ta) / (tb - ta)
        slerp = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([Ta[:3, :3], Tb[:3, :3]])))
        return make_transform(slerp(w).as_matrix(), (1 - w) * Ta[:3, 3] + w * Tb[:3, 3])
