"""Keyframe selection by travelled distance, rotation and time, as LiDAR SLAM front ends do.

Describing and registering every 10 Hz scan is wasteful; places are only worth storing once the
sensor has moved enough to see something new.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.se3 import invert, rotation_error_deg


@dataclass(frozen=True)
class KeyframeSelectorConfig:
    min_distance: float = 1.0  # [m] travelled since the last keyframe
    min_rotation_deg: float = 15.0  # [deg] turned since the last keyframe
    max_interval: float = 0.0  # [s] force a keyframe after this long; 0 disables

    def __post_init__(self) -> None:
        if self.min_distance < 0 or self.min_rotation_deg < 0 or self.max_interval < 0:
            raise ValueError("keyframe thresholds must be >= 0 (min_distance [m], min_rotation_deg, max_interval [s])")


class KeyframeSelector:
    """Accepts a scan when it is far enough (or long enough) from the previous keyframe."""

    def __init__(self, cfg: KeyframeSelectorConfig) -> None:
        self.cfg = cfg
        self._last_pose: np.ndarray | None = None
        self._last_stamp = 0.0
        self.travelled = 0.0  # odometry path length through the accepted keyframes [m]

    def accept(self, stamp: float, pose: np.ndarray) -> bool:
        if not self.due(stamp, pose):
            return False
        return self._take(stamp, pose, 0.0 if self._last_pose is None else float(np.linalg.norm((invert(self._last_pose) @ pose)[:3, 3])))

    def due(self, stamp: float, pose: np.ndarray) -> bool:
        """Whether accept() would take the scan, without taking it: the place node checks a due scan's BEV first."""
        if self._last_pose is None:
            return True
        delta = invert(self._last_pose) @ pose
        far = float(np.linalg.norm(delta[:3, 3])) >= self.cfg.min_distance > 0
        turned = rotation_error_deg(delta, np.eye(4)) >= self.cfg.min_rotation_deg > 0
        stale = stamp - self._last_stamp >= self.cfg.max_interval > 0
        return far or turned or stale

    def _take(self, stamp: float, pose: np.ndarray, distance: float) -> bool:
        self._last_pose, self._last_stamp = pose, stamp
        self.travelled += distance
        return True
