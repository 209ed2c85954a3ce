"""Wheel-odometry-like drift: a scale error on distance and a heading bias that grows per metre.

Loop closure exists to remove exactly this drift, so the simulator makes it explicit and
configurable: the path length is off by `scale_error`, the heading drifts `yaw_drift_deg_per_m`
per metre driven, and both wander by a small random walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.sim.trajectory import Trajectory


@dataclass(frozen=True)
class OdometryConfig:
    scale_error: float = 0.015  # relative error of the travelled distance (1.5 %)
    yaw_drift_deg_per_m: float = 0.01
    scale_noise: float = 0.002  # std of the accumulated distance error (m) per sqrt(metre) driven
    yaw_noise_deg_per_sqrt_m: float = 0.003
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, hi in (
            ("scale_error", abs(self.scale_error), 0.5),
            ("yaw_drift_deg_per_m", abs(self.yaw_drift_deg_per_m), 1.0),
            ("scale_noise", self.scale_noise, 0.1),
            ("yaw_noise_deg_per_sqrt_m", self.yaw_noise_deg_per_sqrt_m, 1.0),
        ):
            if not 0 <= value <= hi:
                raise ValueError(f"OdometryConfig.{name} must be within [-{hi}, {hi}] (noises [0, {hi}]), got {value}")


@dataclass(frozen=True)
class PlanarOdometry:
    """Drifting (x, y, yaw) of the vehicle in the odom frame on the trajectory's dense samples."""

    s: np.ndarray  # arc length of the true path at each sample
    xy: np.ndarray
    yaw: np.ndarray

    def at(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xy = np.column_stack([np.interp(s, self.s, self.xy[:, 0]), np.interp(s, self.s, self.xy[:, 1])])
        return xy, np.interp(s, self.s, self.yaw)


def drifting_odometry(trajectory: Trajectory, config: OdometryConfig) -> PlanarOdometry:
    """Integrate body-frame increments of the true path with scale and heading errors (vectorised)."""
    rng = np.random.default_rng([config.seed, 0x0D0])
    xy, yaw, s = trajectory.xy, trajectory.yaw, trajectory.s
    ds = np.diff(s)
    c0, s0 = np.cos(yaw[:-1]), np.sin(yaw[:-1])
    delta = np.diff(xy, axis=0)
    body = np.column_stack([c0 * delta[:, 0] + s0 * delta[:, 1], -s0 * delta[:, 0] + c0 * delta[:, 1]])
    # white noise on each step's length, sized so the accumulated distance error is a random walk
    scale = 1.0 + config.scale_error + rng.normal(0.0, config.scale_noise, len(ds)) / np.sqrt(np.maximum(ds, 1e-9))
    yaw_error = np.radians(config.yaw_drift_deg_per_m * s + np.concatenate([[0.0], np.cumsum(rng.normal(0.0, config.yaw_noise_deg_per_sqrt_m, len(ds)) * np.sqrt(ds))]))
    odom_yaw = (yaw - yaw[0]) + yaw_error
    c, sn = np.cos(odom_yaw[:-1]), np.sin(odom_yaw[:-1])
    step = body * scale[:, None]
    world_step = np.column_stack([c * step[:, 0] - sn * step[:, 1], sn * step[:, 0] + c * step[:, 1]])
    odom_xy = np.concatenate([np.zeros((1, 2)), np.cumsum(world_step, axis=0)])
    return PlanarOdometry(s, odom_xy, odom_yaw)
