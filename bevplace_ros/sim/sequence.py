"""A simulated drive: world + trajectory + traffic + drifting odometry, scanned on demand.

Scans are computed lazily per keyframe (seeded by frame index) so a long sequence streams to
disk without holding every cloud, and any frame can be regenerated bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from bevplace_ros.se3 import invert
from bevplace_ros.sim.lidar import LidarConfig, scan
from bevplace_ros.sim.odometry import OdometryConfig, PlanarOdometry, drifting_odometry
from bevplace_ros.sim.trajectory import Trajectory, TrajectoryConfig, base_poses, build_trajectory, mount_transform
from bevplace_ros.sim.world import Boxes, World, WorldConfig, build_world, car_boxes


@dataclass(frozen=True)
class SequenceConfig:
    """Everything that defines a simulated drive; equal configs give byte-identical output."""

    world: WorldConfig = field(default_factory=WorldConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    odometry: OdometryConfig = field(default_factory=OdometryConfig)
    keyframe_every: int = 3  # keep every n-th sweep (n x speed x period metres apart)
    max_frames: int | None = None
    traffic_per_edge: float = 1.0  # mean moving cars near each edge traversal, absent on other passes
    mount_xyz: tuple[float, float, float] = (0.3, 0.0, 1.73)  # LiDAR on base_link
    seed: int = 0  # sensor noise

    def __post_init__(self) -> None:
        if not 1 <= self.keyframe_every <= 1000:
            raise ValueError(f"SequenceConfig.keyframe_every must be in [1, 1000], got {self.keyframe_every}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"SequenceConfig.max_frames must be >= 1 or None, got {self.max_frames}")
        if not 0 <= self.traffic_per_edge <= 20:
            raise ValueError(f"SequenceConfig.traffic_per_edge must be in [0, 20], got {self.traffic_per_edge}")


class Traffic(NamedTuple):
    """Cars that exist only while the ego vehicle is near their edge on one particular pass."""

    boxes: Boxes
    active_from: np.ndarray  # seconds
    active_to: np.ndarray


class Revisit(NamedTuple):
    """A run of frames that pass again within `radius` of earlier frames."""

    query_start: int
    query_end: int
    match_start: int
    match_end: int
    direction: str  # "same" or "reverse"


@dataclass
class SimulatedSequence:
    config: SequenceConfig
    world: World
    trajectory: Trajectory
    odometry: PlanarOdometry
    traffic: Traffic
    T_base_lidar: np.ndarray
    stamps: np.ndarray  # (N,) seconds since the start of the drive, sweep start of each keyframe

    def __len__(self) -> int:
        return len(self.stamps)

    def gt_base(self, times: np.ndarray) -> np.ndarray:
        """T_world_base at arbitrary times."""
        xy, yaw = self.trajectory.planar(times)
        return base_poses(self.world, xy, yaw)

    def gt_lidar(self, times: np.ndarray) -> np.ndarray:
        return self.gt_base(times) @ self.T_base_lidar

    @property
    def T_map_world(self) -> np.ndarray:
        """The map frame is the first keyframe's LiDAR frame (KITTI's convention: first pose = I)."""
        return invert(self.gt_lidar(self.stamps[:1])[0])

    def odom_base(self, times: np.ndarray) -> np.ndarray:
        """T_odom_base: drifting planar odometry, with the true tilt and relative height."""
        times = np.asarray(times, float)
        gt = self.gt_base(times)
        xy, yaw = self.odometry.at(times * self.trajectory.speed)
        _, gt_yaw = self.trajectory.planar(times)
        correction = _rot_z(yaw - gt_yaw)
        poses = gt.copy()
        poses[:, :3, :3] = correction @ gt[:, :3, :3]
        poses[:, :2, 3] = xy
        poses[:, 2, 3] = gt[:, 2, 3] - self.gt_base(np.zeros(1))[0, 2, 3]
        return poses

    def scan(self, index: int) -> np.ndarray:
        """Keyframe `index` as LiDAR points (POINT_DTYPE), with this pass's traffic."""
        lidar = self.config.lidar
        stamp = self.stamps[index]
        times = stamp + lidar.column_times() if lidar.motion_skew else stamp + np.zeros(1)
        poses = self.gt_lidar(times)
        active = (self.traffic.active_from <= stamp) & (stamp <= self.traffic.active_to)
        extra = Boxes(*(getattr(self.traffic.boxes, n)[active] for n in ("center", "half", "yaw", "albedo")))
        rng = np.random.default_rng([self.config.seed, index])
        return scan(self.world, poses if lidar.motion_skew else poses[0], lidar, rng, extra)

    def revisits(self, radius: float = 5.0, min_travel_m: float = 50.0) -> list[Revisit]:
        return find_revisits(self.gt_lidar(self.stamps), self.stamps * self.trajectory.speed, radius, min_travel_m)


def simulate_sequence(config: SequenceConfig) -> SimulatedSequence:
    """Build the world, drive it, and fix the keyframe times; scans come later via `scan(i)`."""
    world = build_world(config.world)
    trajectory = build_trajectory(world, config.trajectory)
    odometry = drifting_odometry(trajectory, config.odometry)
    period = config.lidar.scan_period_s
    sweeps = np.arange(int(np.floor((trajectory.duration - period) / period)) + 1)
    stamps = sweeps[:: config.keyframe_every] * period
    if config.max_frames is not None:
        stamps = stamps[: config.max_frames]
    if len(stamps) == 0:
        raise ValueError("the trajectory is shorter than one LiDAR sweep; increase TrajectoryConfig.length_m")
    traffic = _traffic(world, trajectory, config)
    return SimulatedSequence(config, world, trajectory, odometry, traffic, mount_transform(config.mount_xyz), stamps)


def _traffic(world: World, trajectory: Trajectory, config: SequenceConfig) -> Traffic:
    """Oncoming-lane cars on each traversed edge, present only around that traversal's time."""
    rng = np.random.default_rng([config.world.seed, config.trajectory.seed, 0x7AF])
    counts = rng.poisson(config.traffic_per_edge, len(trajectory.edges))
    owner = np.repeat(np.arange(len(trajectory.edges)), counts)
    start, end = trajectory.edges[owner, 0], trajectory.edges[owner, 1]
    length = np.linalg.norm(end - start, axis=1)
    u = (end - start) / np.maximum(length, 1e-9)[:, None]
    clearance = world.road_width / 2 + 6.0
    along = clearance + rng.random(len(owner)) * np.maximum(length - 2 * clearance, 0.0)
    lane = -rng.uniform(1.5, min(3.0, world.road_width / 2 - 2.0), len(owner))  # left of travel: oncoming lane
    xy = start + u * along[:, None] + np.column_stack([u[:, 1], -u[:, 0]]) * lane[:, None]
    boxes = car_boxes(rng, world.ground, xy, np.arctan2(-u[:, 1], -u[:, 0]))
    times = trajectory.s / trajectory.speed
    first = np.full(len(trajectory.edges), np.inf)
    last = np.full(len(trajectory.edges), -np.inf)
    np.minimum.at(first, trajectory.traversal, times)
    np.maximum.at(last, trajectory.traversal, times)
    return Traffic(boxes, first[owner] - 3.0, last[owner] + 3.0)


def find_revisits(poses: np.ndarray, travelled: np.ndarray, radius: float = 5.0, min_travel_m: float = 50.0) -> list[Revisit]:
    """Runs of frames within `radius` of a frame driven at least `min_travel_m` earlier."""
    from scipy.spatial import cKDTree

    xyz = poses[:, :3, 3]
    heading = poses[:, :3, 0]
    tree = cKDTree(xyz)
    match = np.full(len(xyz), -1)
    for i, neighbours in enumerate(tree.query_ball_point(xyz, radius)):
        earlier = [j for j in neighbours if travelled[i] - travelled[j] >= min_travel_m]
        if earlier:
            match[i] = min(earlier, key=lambda j: np.linalg.norm(xyz[i] - xyz[j]))
    runs: list[Revisit] = []
    for i in np.flatnonzero(match >= 0):
        j = int(match[i])
        direction = "same" if float(heading[i] @ heading[j]) > 0 else "reverse"
        last = runs[-1] if runs else None
        if last and last.query_end == i - 1 and last.direction == direction and abs(j - int(match[i - 1])) <= 5:
            runs[-1] = last._replace(query_end=int(i), match_start=min(last.match_start, j), match_end=max(last.match_end, j))
        else:
            runs.append(Revisit(int(i), int(i), j, j, direction))
    return runs


def _rot_z(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    out = np.zeros((len(angle), 3, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 1, 0], out[:, 1, 1], out[:, 2, 2] = c, -s, s, c, 1.0
    return out
