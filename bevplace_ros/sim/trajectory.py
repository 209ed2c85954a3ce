"""Drives on the road grid: a route of intersections becomes a smooth, lane-offset path in time.

Each edge traversal gets its own lane offset, so revisits of a road are a few metres apart
laterally, and the opposite direction lies across the centre line, as on real roads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bevplace_ros.se3 import make_transform
from bevplace_ros.sim.world import World

Node = tuple[int, int]


@dataclass(frozen=True)
class TrajectoryConfig:
    """How the vehicle drives; `route=None` means a seeded random walk without U-turns."""

    route: tuple[Node, ...] | None = None  # grid intersections (i along x, j along y) in visiting order
    length_m: float = 600.0  # random-walk length
    speed_mps: float = 10.0
    lane_offsets_m: tuple[float, ...] = (1.5, 3.0)  # right of the centre line, one drawn per edge traversal
    corner_radius_m: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 <= self.speed_mps <= 40:
            raise ValueError(f"TrajectoryConfig.speed_mps must be in [0.5, 40], got {self.speed_mps}")
        if not 10 <= self.length_m <= 1e6:
            raise ValueError(f"TrajectoryConfig.length_m must be in [10, 1e6], got {self.length_m}")
        if not self.lane_offsets_m or any(o < 0 or o > 10 for o in self.lane_offsets_m):
            raise ValueError(f"TrajectoryConfig.lane_offsets_m must be non-empty values in [0, 10], got {self.lane_offsets_m}")
        if not 2 <= self.corner_radius_m <= 30:
            raise ValueError(f"TrajectoryConfig.corner_radius_m must be in [2, 30], got {self.corner_radius_m}")
        if self.route is not None and len(self.route) < 2:
            raise ValueError("TrajectoryConfig.route needs at least two intersections")


@dataclass(frozen=True)
class Trajectory:
    """A densely sampled path (every ~0.2 m) with arc length, heading and the edge traversal index."""

    xy: np.ndarray  # (M, 2)
    s: np.ndarray  # (M,) arc length
    yaw: np.ndarray  # (M,) unwrapped heading
    traversal: np.ndarray  # (M,) which edge traversal each sample belongs to
    edges: np.ndarray  # (K, 2, 2) start/end of each traversed edge (centre line)
    lanes: np.ndarray  # (K,) lane offset used on each traversal
    speed: float

    @property
    def duration(self) -> float:
        return float(self.s[-1] / self.speed)

    def planar(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) and heading at the given times (seconds since the start)."""
        s = np.clip(np.asarray(times, float) * self.speed, 0.0, self.s[-1])
        xy = np.column_stack([np.interp(s, self.s, self.xy[:, 0]), np.interp(s, self.s, self.xy[:, 1])])
        return xy, np.interp(s, self.s, self.yaw)

    def traversal_at(self, times: np.ndarray) -> np.ndarray:
        s = np.clip(np.asarray(times, float) * self.speed, 0.0, self.s[-1])
        return self.traversal[np.clip(np.searchsorted(self.s, s), 0, len(self.s) - 1)]


def base_poses(world: World, xy: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """T_world_base on the ground: heading follows the path, roll and pitch follow the ground slope."""
    grad = world.ground.gradient(xy)
    c, s = np.cos(yaw), np.sin(yaw)
    x_axis = np.column_stack([c, s, grad[:, 0] * c + grad[:, 1] * s])
    x_axis /= np.linalg.norm(x_axis, axis=1, keepdims=True)
    z_axis = np.column_stack([-grad, np.ones(len(xy))])
    z_axis /= np.linalg.norm(z_axis, axis=1, keepdims=True)
    y_axis = np.cross(z_axis, x_axis)
    poses = np.tile(np.eye(4), (len(xy), 1, 1))
    poses[:, :3, :3] = np.stack([x_axis, y_axis, z_axis], axis=2)
    poses[:, :3, 3] = np.column_stack([xy, world.ground.height(xy)])
    return poses


def plan_route(world: World, config: TrajectoryConfig) -> list[Node]:
    """The configured route (checked) or a random walk long enough for `length_m`."""
    nx, ny = len(world.road_x), len(world.road_y)
    if config.route is not None:
        route = [tuple(int(v) for v in node) for node in config.route]
        for a, b in zip(route, route[1:]):
            if not (0 <= b[0] < nx and 0 <= b[1] < ny) or abs(a[0] - b[0]) + abs(a[1] - b[1]) != 1:
                raise ValueError(f"TrajectoryConfig.route: {a} -> {b} is not a road edge of this {nx}x{ny} grid")
        return route
    rng = np.random.default_rng([config.seed, 0x7A4])
    route = [(int(rng.integers(nx)), int(rng.integers(ny)))]
    length = 0.0
    while length < config.length_m + 2 * config.corner_radius_m:
        i, j = route[-1]
        options = [(a, b) for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)) if 0 <= a < nx and 0 <= b < ny]
        if len(route) > 1 and len(options) > 1:
            options.remove(route[-2])  # no U-turns
        nxt = options[int(rng.integers(len(options)))]
        length += float(np.linalg.norm(world.node_xy(*nxt) - world.node_xy(i, j)))
        route.append(nxt)
    return route


def build_trajectory(world: World, config: TrajectoryConfig) -> Trajectory:
    """Offset every edge to its lane, round the corners with Bezier curves and sample densely."""
    route = plan_route(world, config)
    rng = np.random.default_rng([config.seed, 0x1A4E])
    clear = world.road_width / 2 - 3.3  # parked cars reach ~2.05 m in from the road edge; + half a car + 0.35 m
    lanes = np.minimum(np.asarray(config.lane_offsets_m)[rng.integers(len(config.lane_offsets_m), size=len(route) - 1)], clear)
    nodes = np.array([world.node_xy(*n) for n in route])
    u = np.diff(nodes, axis=0)
    length = np.linalg.norm(u, axis=1)
    u /= length[:, None]
    normal = np.column_stack([u[:, 1], -u[:, 0]]) * lanes[:, None]  # right of travel
    r = config.corner_radius_m
    if np.any(length < 2 * r + 2):
        raise ValueError(f"TrajectoryConfig.corner_radius_m {r} is too large for {length.min():.1f} m road edges")

    pieces, owners = [], []
    start = nodes[0] + normal[0]
    for k in range(len(u)):
        end_node = nodes[k + 1]
        if k == len(u) - 1:
            pieces.append(_line(start, end_node + normal[k]))
            owners.append(k)
            break
        if np.dot(u[k], u[k + 1]) < -0.5:
            raise ValueError(f"TrajectoryConfig.route makes a U-turn at {route[k + 1]}")
        if np.dot(u[k], u[k + 1]) > 0.5:  # straight on, maybe changing lane
            e, sn = end_node + normal[k] - u[k] * r, end_node + normal[k + 1] + u[k] * r
            corner = _bezier([e, e + u[k] * r * 0.7, sn - u[k] * r * 0.7, sn])
        else:  # 90 degree turn: the two offset lines meet at p
            p = end_node + normal[k] + normal[k + 1]
            e, sn = p - u[k] * r, p + u[k + 1] * r
            corner = _bezier([e, p, sn])
        pieces += [_line(start, e), corner]
        owners += [k, k + 1]
        start = sn
    xy = np.concatenate([piece[:-1] for piece in pieces] + [pieces[-1][-1:]])
    traversal = np.concatenate([np.full(len(piece) - 1, owner) for piece, owner in zip(pieces, owners)] + [[owners[-1]]])
    step = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    keep = np.concatenate([[True], step > 1e-9])
    xy, traversal = xy[keep], traversal[keep]
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    tangent = np.gradient(xy, s, axis=0)
    yaw = np.unwrap(np.arctan2(tangent[:, 1], tangent[:, 0]))
    edges = np.stack([nodes[:-1], nodes[1:]], axis=1)
    return Trajectory(xy, s, yaw, traversal.astype(np.int64), edges, lanes, config.speed_mps)


def _line(a: np.ndarray, b: np.ndarray, step: float = 0.2) -> np.ndarray:
    n = max(2, int(np.ceil(np.linalg.norm(b - a) / step)) + 1)
    return a + np.linspace(0.0, 1.0, n)[:, None] * (b - a)


def _bezier(control: list[np.ndarray], n: int = 60) -> np.ndarray:
    """Bezier curve through the control polygon (de Casteljau, vectorised over the samples)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    points = [np.broadcast_to(c, (n, 2)) for c in control]
    while len(points) > 1:
        points = [(1 - t) * a + t * b for a, b in zip(points, points[1:])]
    return points[0]


def mount_transform(xyz: tuple[float, float, float]) -> np.ndarray:
    """T_base_lidar for a LiDAR mounted level at `xyz` on the vehicle."""
    return make_transform(np.eye(3), np.asarray(xyz, float))
