"""Undo the motion inside one LiDAR sweep, so that a scan is the sensor's view from the pose at its stamp.

A spinning LiDAR fires its columns over ~0.1 s; at 10 m/s and 90 deg/s the last point is taken 1 m and 9 deg away
from the first. Registration of two such scans finds the pose of some mid-sweep average, not the relation of the
two stamps that the pose graph's nodes stand for: on the simulator's sharp turns that put verified loops 5-9 deg off.
The motion over the sweep is taken as constant (the usual LiDAR-odometry model, e.g. KISS-ICP's), from odometry.
"""

from __future__ import annotations

import numpy as np

from bevplace_ros.se3 import se3_exp, se3_log

TIME_BINS = 256  # points move with the pose of their time bin: 0.4 ms bins over a 0.1 s sweep, 2.6 cm at 100 m and 90 deg/s


def sweep_twist(T_a: np.ndarray, T_b: np.ndarray, dt: float) -> np.ndarray:
    """(6,) twist per second (rotation vector, translation part) of the motion T_a -> T_b, sensor poses `dt` s apart."""
    if dt <= 0:
        raise ValueError(f"need poses at two different times, got dt {dt}")
    return se3_log(np.linalg.solve(T_a, T_b)) / dt


def deskew(points: np.ndarray, offsets: np.ndarray, twist: np.ndarray) -> np.ndarray:
    """Points (N, >=3) fired `offsets` seconds after the stamp, moved into the sensor frame at the stamp.

    With a constant twist the sensor pose at offset t, seen from the stamp's pose, is se3_exp(t * twist).
    """
    if len(points) == 0:
        return points
    low, span = float(offsets.min()), max(float(np.ptp(offsets)), 1e-9)
    which = np.minimum(((offsets - low) * (TIME_BINS / span)).astype(np.int32), TIME_BINS - 1)
    poses = se3_exp((low + (np.arange(TIME_BINS) + 0.5) * (span / TIME_BINS))[:, None] * twist)  # (TIME_BINS, 4, 4)
    rows = poses[:, :3, :].transpose(0, 2, 1).astype(np.float32)  # (TIME_BINS, 4, 3): [x y z 1] @ rows = R x + t
    homogeneous = np.concatenate([points[:, :3].astype(np.float32), np.ones((len(points), 1), np.float32)], axis=1)
    out = points.copy()
    out[:, :3] = np.einsum("nk,nkj->nj", homogeneous, rows[which])
    return out
