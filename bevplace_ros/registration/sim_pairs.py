"""Registration pairs cast in the procedural simulator: sensor poses on its roads, exact ground truth.

Pairs come straight from `bevplace_ros.sim` (world + LiDAR) rather than recorded sequences so each
kind of pair can be drawn in the numbers a protocol needs: overlapping pairs for training,
KITTI-style pairs >= 10 m apart, revisits ("loops", any heading) and hard false candidates > 20 m apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from bevplace_ros.se3 import invert, make_transform

PAIR_KINDS = ("train", "odometry", "loop", "false")
# (min, max) distance in metres between the two sensor positions, per pair kind
DISTANCES = {"train": (0.0, 14.0), "odometry": (10.0, 14.0), "loop": (0.0, 6.0), "false": (25.0, 60.0)}
SENSOR_HEIGHT = 1.73  # KITTI's Velodyne height


@dataclass(frozen=True)
class SimPair:
    source: np.ndarray  # (N, 4) x, y, z, intensity in the source LiDAR frame
    target: np.ndarray  # (M, 4)
    T_target_source: np.ndarray
    distance: float
    kind: str


def _road_pose(world, rng: np.random.Generator, along: float | None, line: tuple[int, int] | None,
               tilt_deg: float) -> tuple[np.ndarray, tuple[int, int], float]:
    """A sensor pose on a road centre line (+ lateral jitter), any yaw, small roll/pitch."""
    if line is None:
        axis = int(rng.integers(2))
        roads = world.road_x if axis == 0 else world.road_y
        line = (axis, int(rng.integers(len(roads))))
    axis, index = line
    span = world.road_y if axis == 0 else world.road_x
    if along is None:
        along = float(rng.uniform(span[0] + 10.0, span[-1] - 10.0))
    lateral = float(rng.uniform(-0.25, 0.25) * world.road_width)
    fixed = (world.road_x if axis == 0 else world.road_y)[index] + lateral
    xy = np.array([fixed, along]) if axis == 0 else np.array([along, fixed])
    z = float(world.ground.height(xy[None])[0]) + SENSOR_HEIGHT
    roll, pitch = rng.uniform(-tilt_deg, tilt_deg, 2)
    rot = Rotation.from_euler("zyx", [rng.uniform(-np.pi, np.pi), np.radians(pitch), np.radians(roll)]).as_matrix()
    return make_transform(rot, np.array([xy[0], xy[1], z])), line, along


def sample_pair(world, kind: str, rng: np.random.Generator, lidar_cfg=None, tilt_deg: float = 5.0) -> SimPair:
    """Two scans of `world` whose sensor positions are DISTANCES[kind] apart along one road."""
    from bevplace_ros.sim.lidar import LidarConfig, scan

    if kind not in PAIR_KINDS:
        raise ValueError(f"kind must be one of {PAIR_KINDS}, got {kind!r}")
    lidar_cfg = lidar_cfg or LidarConfig()
    low, high = DISTANCES[kind]
    pose_a, line, along = _road_pose(world, rng, None, None, tilt_deg)
    span = world.road_y if line[0] == 0 else world.road_x
    step = float(rng.uniform(low, high)) * (1 if rng.random() < 0.5 else -1)
    if not span[0] + 5.0 < along + step < span[-1] - 5.0:
        step = -step
    pose_b, _, _ = _road_pose(world, rng, along + step, line, tilt_deg)
    pts = []
    for pose in (pose_a, pose_b):
        raw = scan(world, pose, lidar_cfg, rng)
        pts.append(np.stack([raw["x"], raw["y"], raw["z"], raw["intensity"]], axis=1).astype(np.float32))
    return SimPair(source=pts[0], target=pts[1], T_target_source=invert(pose_b) @ pose_a,
                   distance=float(np.linalg.norm(pose_a[:3, 3] - pose_b[:3, 3])), kind=kind)


def sample_pairs(style: str, seed: int, kinds: dict[str, int], tilt_deg: float = 5.0) -> list[SimPair]:
    """`kinds[k]` pairs of each kind from the world (style, seed); deterministic in (style, seed)."""
    from bevplace_ros.sim.world import WorldConfig, build_world

    world = build_world(WorldConfig(seed=seed, style=style))
    rng = np.random.default_rng([seed, 0xC0FFEE])
    return [sample_pair(world, kind, rng, tilt_deg=tilt_deg) for kind, n in kinds.items() for _ in range(n)]
