"""A deliberately repetitive drive: a rectangular block lined with identical buildings and poles.

Every `period_m` along a street the scene repeats exactly, so two scans one period apart differ
only near the ends of the street: the place where descriptors and ICP are fooled. The drive goes
round the block more than once (a second lap in another lane gives the true revisits) with
drifting odometry, so wrong loops visibly damage the trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.se3 import invert, xyyaw_to_matrix
from bevplace_ros.sim.lidar import LidarConfig, scan
from bevplace_ros.sim.world import Boxes, Frustums, Ground, World, WorldConfig

SENSOR_HEIGHT_M = 1.73


@dataclass(frozen=True)
class CorridorConfig:
    length_m: float = 192.0  # long streets of identical buildings
    width_m: float = 72.0  # short streets
    period_m: float = 24.0  # the scene repeats every this many metres
    laps: float = 1.35
    spacing_m: float = 4.0  # keyframe spacing
    lane_m: tuple[float, float] = (2.0, 3.0)  # lane offset (right of the centre line) of lap 1 and lap 2
    scale_error: float = 0.02  # odometry drift: distance scale error
    yaw_drift_deg_per_m: float = 0.03
    beams: int = 16
    columns: int = 360
    max_range_m: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.length_m >= 2 * self.period_m and self.width_m >= 2 * self.period_m and self.period_m >= 16.0):
            raise ValueError("CorridorConfig: need period_m >= 16 and length_m, width_m >= 2 * period_m")
        if not (1.0 < self.laps <= 5.0 and 0.5 <= self.spacing_m <= 20.0):
            raise ValueError(f"CorridorConfig: laps must be in (1, 5] and spacing_m in [0.5, 20], got {self.laps}, {self.spacing_m}")


@dataclass(frozen=True)
class CorridorDrive:
    """Keyframes of the drive: exact poses, drifting odometry, arc length and the world to scan."""

    config: CorridorConfig
    world: World
    gt: np.ndarray  # (N, 4, 4) T_world_lidar
    odom: np.ndarray  # (N, 4, 4) T_odom_lidar (odom = first keyframe's frame)
    arc: np.ndarray  # (N,) metres driven
    heading: np.ndarray  # (N, 2) unit direction of travel

    def __len__(self) -> int:
        return len(self.arc)

    def scan(self, index: int) -> np.ndarray:
        """(M, 3) float32 points of keyframe `index` in its LiDAR frame."""
        cfg = self.config
        lidar = LidarConfig(beams=cfg.beams, columns=cfg.columns, max_range_m=cfg.max_range_m, motion_skew=False)
        points = scan(self.world, self.gt[index], lidar, np.random.default_rng([cfg.seed, index]))
        return np.stack([points["x"], points["y"], points["z"]], axis=1).astype(np.float32)

    def gt_map(self) -> np.ndarray:
        """T_map_lidar with map = the first keyframe's frame (the graph's anchor)."""
        return invert(self.gt[0]) @ self.gt


def corridor_world(cfg: CorridorConfig) -> World:
    """Identical 14 x 10 x 9 m buildings every period on both sides of each street, a pole between."""
    centers, halves, yaws, poles = [], [], [], []
    corners = np.array([[0, 0], [cfg.length_m, 0], [cfg.length_m, cfg.width_m], [0, cfg.width_m]], float)
    for a, b in zip(corners, np.roll(corners, -1, axis=0)):
        direction = (b - a) / np.linalg.norm(b - a)
        normal = np.array([-direction[1], direction[0]])
        yaw = np.arctan2(direction[1], direction[0])
        for s in np.arange(cfg.period_m, np.linalg.norm(b - a) - cfg.period_m / 2, cfg.period_m):
            for side in (-1.0, 1.0):
                xy = a + s * direction + side * 13.0 * normal
                centers.append([*xy, 4.5])
                halves.append([7.0, 5.0, 4.5])
                yaws.append(yaw)
            poles.append(a + (s + cfg.period_m / 2) * direction - 7.0 * normal)
    boxes = Boxes(np.array(centers), np.array(halves), np.array(yaws), np.full(len(yaws), 0.5))
    n = len(poles)
    frustums = Frustums(np.array(poles), np.full(n, -0.5), np.full(n, 6.0), np.full(n, 0.15), np.full(n, 0.15), np.full(n, 0.6))
    flat = Ground(np.zeros(1), np.zeros((1, 2)), np.zeros(1))
    return World(WorldConfig(seed=cfg.seed), flat, boxes, frustums, np.array([0.0, cfg.length_m]), np.array([0.0, cfg.width_m]), 10.0)


def corridor_drive(cfg: CorridorConfig) -> CorridorDrive:
    """Counter-clockwise laps (right-hand lane = outside), keyframes every spacing_m, drifting odometry."""
    perimeter = 2 * (cfg.length_m + cfg.width_m)
    arc = np.arange(0.0, cfg.laps * perimeter, cfg.spacing_m)
    arc[arc >= perimeter] += cfg.spacing_m / 2  # lap 2 samples fall between lap 1's
    lane = np.where(arc < perimeter, cfg.lane_m[0], cfg.lane_m[1])
    xy, heading = _rectangle_point(arc % perimeter, cfg.length_m, cfg.width_m)
    xy = xy + lane[:, None] * np.stack([heading[:, 1], -heading[:, 0]], axis=1)  # right of travel
    yaw = np.arctan2(heading[:, 1], heading[:, 0])
    gt = np.stack([xyyaw_to_matrix(x, y, t) for (x, y), t in zip(xy, yaw)])
    gt[:, 2, 3] = SENSOR_HEIGHT_M
    return CorridorDrive(cfg, corridor_world(cfg), gt, _drifting(gt, cfg), arc, heading)


def _rectangle_point(s: np.ndarray, length: float, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and heading at arc length s along the rectangle's centre lines, counter-clockwise."""
    bounds = np.cumsum([0.0, length, width, length, width])
    starts = np.array([[0, 0], [length, 0], [length, width], [0, width]], float)
    dirs = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], float)
    edge = np.clip(np.searchsorted(bounds, s, side="right") - 1, 0, 3)
    return starts[edge] + (s - bounds[edge])[:, None] * dirs[edge], dirs[edge]


def _drifting(gt: np.ndarray, cfg: CorridorConfig) -> np.ndarray:
    """Odometry that scales every step and turns a little per metre: drift grows along the drive."""
    odom = [np.eye(4)]
    for a, b in zip(gt[:-1], gt[1:]):
        step = invert(a) @ b
        dist = float(np.linalg.norm(step[:3, 3]))
        step[:3, 3] *= 1.0 + cfg.scale_error
        odom.append(odom[-1] @ step @ xyyaw_to_matrix(0.0, 0.0, np.radians(cfg.yaw_drift_deg_per_m * dist)))
    return np.stack(odom)
