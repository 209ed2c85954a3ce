"""A spinning multi-beam LiDAR: every ray of a sweep is cast at once against the world's primitives.

Culling is per primitive, not per ray: each primitive's bounding circle gives the block of
columns (azimuth) and beams (elevation) that can see it, and only those (ray, primitive) pairs
are intersected. Motion skew is modelled by giving every column its own sensor pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.sim.raycast import ray_boxes, ray_frustums, ray_ground
from bevplace_ros.sim.world import Boxes, World

# The Velodyne driver's PointXYZIRT layout (point_step 22): what real ROS 2 bags carry.
POINT_DTYPE = np.dtype(
    {"names": ["x", "y", "z", "intensity", "ring", "time"], "formats": ["<f4", "<f4", "<f4", "<f4", "<u2", "<f4"], "offsets": [0, 4, 8, 12, 16, 18], "itemsize": 22}
)


@dataclass(frozen=True)
class LidarConfig:
    """Sensor geometry and imperfections; defaults resemble a 32-beam automotive unit."""

    beams: int = 32
    columns: int = 512
    fov_up_deg: float = 15.0
    fov_down_deg: float = -25.0
    min_range_m: float = 1.0
    max_range_m: float = 100.0
    range_noise_m: float = 0.02  # Gaussian sigma on each range
    dropout: float = 0.01  # probability a return is lost
    scan_period_s: float = 0.1  # one revolution (10 Hz)
    motion_skew: bool = True  # each column fired from its own pose along the sweep

    def __post_init__(self) -> None:
        checks = [
            ("beams", 1 <= self.beams <= 256, "[1, 256]"),
            ("columns", 8 <= self.columns <= 8192, "[8, 8192]"),
            ("fov_up_deg", -90 < self.fov_up_deg <= 90 and self.fov_up_deg > self.fov_down_deg, "(fov_down_deg, 90]"),
            ("fov_down_deg", -90 <= self.fov_down_deg < 90, "[-90, 90)"),
            ("min_range_m", 0 < self.min_range_m < self.max_range_m, "(0, max_range_m)"),
            ("max_range_m", self.max_range_m <= 1000, "(min_range_m, 1000]"),
            ("range_noise_m", 0 <= self.range_noise_m <= 1, "[0, 1]"),
            ("dropout", 0 <= self.dropout < 1, "[0, 1)"),
            ("scan_period_s", 0 < self.scan_period_s <= 1, "(0, 1]"),
        ]
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"LidarConfig.{name} must be in {accepted}, got {getattr(self, name)}")

    def elevations(self) -> np.ndarray:
        """Beam elevations (rad), ring 0 lowest, evenly spread over the vertical field of view."""
        return np.radians(np.linspace(self.fov_down_deg, self.fov_up_deg, self.beams))

    def azimuths(self) -> np.ndarray:
        return 2 * np.pi * np.arange(self.columns) / self.columns

    def column_times(self) -> np.ndarray:
        """Firing time of each column after the sweep starts (the `time` field)."""
        return self.scan_period_s * np.arange(self.columns) / self.columns


def local_directions(config: LidarConfig) -> np.ndarray:
    """(beams, columns, 3) unit ray directions in the LiDAR frame."""
    el, az = np.meshgrid(config.elevations(), config.azimuths(), indexing="ij")
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=-1)


def scan(world: World, poses: np.ndarray, config: LidarConfig, rng: np.random.Generator, extra: Boxes | None = None) -> np.ndarray:
    """One sweep as POINT_DTYPE points in the LiDAR frame (misses dropped).

    `poses` is T_world_lidar, either (4, 4) for a still sensor or (columns, 4, 4) with the pose at
    each column's firing time; `extra` holds transient objects (traffic) present for this sweep only.
    """
    poses = np.broadcast_to(poses, (config.columns, 4, 4)) if poses.shape == (4, 4) else poses
    if poses.shape != (config.columns, 4, 4):
        raise ValueError(f"poses must be (4, 4) or ({config.columns}, 4, 4), got {poses.shape}")
    local = local_directions(config)
    dirs = np.einsum("cij,bcj->bci", poses[:, :3, :3], local).reshape(-1, 3)
    origins = np.broadcast_to(poses[None, :, :3, 3], local.shape).reshape(-1, 3)
    t, normal, albedo = _nearest_hits(world, origins, dirs, poses, config, extra)

    ranges = t + rng.normal(0.0, config.range_noise_m, t.shape) if config.range_noise_m > 0 else t
    keep = np.isfinite(t) & (ranges >= config.min_range_m) & (ranges <= config.max_range_m)
    if config.dropout > 0:
        keep &= rng.random(t.shape) >= config.dropout
    cos_incidence = np.abs(np.einsum("ij,ij->i", normal, dirs))
    intensity = np.clip(albedo * cos_incidence + rng.normal(0.0, 0.02, t.shape), 0.0, 1.0)

    ring, column = np.divmod(np.arange(t.size), config.columns)
    points = np.zeros(int(keep.sum()), dtype=POINT_DTYPE)
    xyz = local.reshape(-1, 3)[keep] * ranges[keep, None]
    points["x"], points["y"], points["z"] = xyz.T
    points["intensity"] = intensity[keep]
    points["ring"] = ring[keep]
    points["time"] = config.column_times()[column[keep]]
    return points


def _nearest_hits(world: World, origins, dirs, poses, config: LidarConfig, extra: Boxes | None):
    """Nearest hit distance, normal and albedo per ray over ground, boxes and frusta."""
    n_rays = len(dirs)
    best = np.full(n_rays, np.inf)
    normal = np.zeros((n_rays, 3))
    albedo = np.zeros(n_rays)

    could_hit_ground = dirs[:, 2] < world.ground.max_slope + 1e-3
    rays = np.flatnonzero(could_hit_ground)
    t, n = ray_ground(origins[rays], dirs[rays], world.ground, config.min_range_m * 0.5, config.max_range_m)
    best[rays], normal[rays], albedo[rays] = t, n, world.ground.albedo

    boxes = world.boxes if extra is None else Boxes.concat([world.boxes, extra])
    frustums = world.frustums
    box_z = np.stack([boxes.center[:, 2] - boxes.half[:, 2], boxes.center[:, 2] + boxes.half[:, 2]], axis=1)
    fr_z = np.stack([frustums.z0, frustums.z1], axis=1)
    for kind, center, radius, zrange in (("box", boxes.center[:, :2], boxes.radius_xy(), box_z), ("frustum", frustums.center, frustums.radius_xy(), fr_z)):
        ray_idx, prim_idx = _candidate_pairs(center, radius, zrange, poses, config)
        if kind == "box":
            t, n = ray_boxes(origins[ray_idx], dirs[ray_idx], boxes.center[prim_idx], boxes.half[prim_idx], boxes.yaw[prim_idx])
            prim_albedo = boxes.albedo
        else:
            f = frustums
            t, n = ray_frustums(origins[ray_idx], dirs[ray_idx], f.center[prim_idx], f.z0[prim_idx], f.z1[prim_idx], f.r0[prim_idx], f.r1[prim_idx])
            prim_albedo = f.albedo
        np.minimum.at(best, ray_idx, t)
        won = np.isfinite(t) & (t == best[ray_idx])
        normal[ray_idx[won]] = n[won]
        albedo[ray_idx[won]] = prim_albedo[prim_idx[won]]
    return best, normal, albedo


def _candidate_pairs(center_xy: np.ndarray, radius: np.ndarray, zrange: np.ndarray, poses: np.ndarray, config: LidarConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ray, primitive) pairs whose column and beam blocks can see the primitive's bounding cylinder."""
    if len(radius) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    mid = poses[len(poses) // 2]
    sweep = float(np.linalg.norm(poses[-1, :3, 3] - poses[0, :3, 3]))
    tilt = float(np.arccos(np.clip(mid[2, 2], -1.0, 1.0)))
    margin = tilt + 2 * np.pi / config.columns + np.radians(1.0)
    rel = center_xy - mid[:2, 3]
    dist = np.linalg.norm(rel, axis=1)
    r = radius + sweep + 0.05
    visible = dist - r < config.max_range_m
    inside = dist <= r
    yaw = np.arctan2(mid[1, 0], mid[0, 0])
    az = np.arctan2(rel[:, 1], rel[:, 0]) - yaw
    half_width = np.where(inside, np.pi, np.arcsin(np.clip(r / np.maximum(dist, 1e-9), 0.0, 1.0)) + margin)
    step = 2 * np.pi / config.columns
    c0 = np.floor((az - half_width) / step).astype(np.int64)
    nc = np.where(inside, config.columns, np.minimum(np.ceil(2 * half_width / step).astype(np.int64) + 2, config.columns))

    dz_lo, dz_hi = zrange[:, 0] - mid[2, 3], zrange[:, 1] - mid[2, 3]
    near, far = np.maximum(dist - r, 0.1), dist + r
    el_lo = np.where(inside, -np.pi / 2, np.arctan2(dz_lo, np.where(dz_lo < 0, near, far))) - margin
    el_hi = np.where(inside, np.pi / 2, np.arctan2(dz_hi, np.where(dz_hi > 0, near, far))) + margin
    elevations = config.elevations()
    b0 = np.searchsorted(elevations, el_lo, side="left")
    nb = np.searchsorted(elevations, el_hi, side="right") - b0
    counts = np.where(visible & (nb > 0), nc * nb, 0)

    prim = np.repeat(np.arange(len(radius)), counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    column = (c0[prim] + local % nc[prim]) % config.columns
    beam = b0[prim] + local // nc[prim]
    return beam * config.columns + column, prim
