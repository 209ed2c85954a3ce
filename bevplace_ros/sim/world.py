"""A procedural outdoor world (roads, buildings, trees, poles, cars, walls, uneven ground) from a seed.

Everything is stored as arrays of analytic primitives (oriented boxes, vertical frusta that cover
cylinders and cones, a smooth height field) so the LiDAR can intersect all rays with all nearby
primitives in a few vectorised numpy passes. Styles differ in block size, building size and the
street furniture mix, so a model trained on one style can be tested on another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STYLES = ("urban", "suburban", "industrial")


@dataclass(frozen=True)
class StyleParams:
    """Per-style ranges (metres) drawn from when building the world."""

    block: tuple[float, float]  # block side between road centre lines
    road_width: float
    lot: tuple[float, float]  # guillotine-split lot sides inside a block
    setback: tuple[float, float]  # building inset from its lot edge
    height: tuple[float, float]
    empty_lot: float  # probability a lot stays open (parking, plaza, yard)
    yaw_jitter_deg: float
    tree_spacing: tuple[float, float]
    pole_spacing: tuple[float, float]
    parked_car: float  # probability per 7 m curb slot
    fence: float  # probability a lot boundary carries a fence
    wall: float  # probability a block perimeter carries a wall


STYLE_PARAMS: dict[str, StyleParams] = {
    "urban": StyleParams((55, 80), 16, (14, 30), (0.3, 2.0), (9, 40), 0.08, 0, (20, 45), (22, 30), 0.45, 0.0, 0.1),
    "suburban": StyleParams((45, 65), 12, (13, 20), (3, 7), (4, 9), 0.15, 12, (8, 16), (30, 40), 0.25, 0.6, 0.0),
    "industrial": StyleParams((80, 115), 14, (28, 55), (3, 10), (6, 16), 0.25, 0, (35, 70), (28, 36), 0.15, 0.1, 0.6),
}


@dataclass(frozen=True)
class WorldConfig:
    """What world to build; the same config always builds the same world."""

    seed: int = 0
    style: str = "suburban"
    blocks_x: int = 3  # blocks along x (road lines = blocks + 1)
    blocks_y: int = 3
    ground_amplitude_m: float = 0.6  # peak height of the rolling ground
    ground_float32: bool = False  # ground sines in float32: about 10x faster, heights off by ~1e-6 m (long drives)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"WorldConfig.style must be one of {STYLES}, got {self.style!r}")
        if not (1 <= self.blocks_x <= 50 and 1 <= self.blocks_y <= 50):
            raise ValueError(f"WorldConfig.blocks_x/blocks_y must be in [1, 50], got {self.blocks_x}, {self.blocks_y}")
        if not 0.0 <= self.ground_amplitude_m <= 5.0:
            raise ValueError(f"WorldConfig.ground_amplitude_m must be in [0, 5], got {self.ground_amplitude_m}")


@dataclass(frozen=True)
class Ground:
    """z = sum_k a_k sin(w_k . xy + phi_k): smooth, so ray marching plus bisection is exact enough."""

    amplitude: np.ndarray  # (K,)
    wave: np.ndarray  # (K, 2) rad/m
    phase: np.ndarray  # (K,)
    albedo: float = 0.25
    float32: bool = False  # evaluate the sines in float32 (numpy's float64 sine is the ray caster's main cost)

    def height(self, xy: np.ndarray) -> np.ndarray:
        return _weighted_sum(self._waves(xy, np.sin), self.amplitude)

    def gradient(self, xy: np.ndarray) -> np.ndarray:
        slope = self._waves(xy, np.cos) * self.amplitude
        return np.stack([_weighted_sum(slope, self.wave[:, 0]), _weighted_sum(slope, self.wave[:, 1])], axis=-1)

    def _waves(self, xy: np.ndarray, function: np.ufunc) -> np.ndarray:
        phase = xy[..., 0:1] * self.wave[:, 0] + xy[..., 1:2] * self.wave[:, 1] + self.phase
        return function(phase.astype(np.float32)) if self.float32 else function(phase)

    @property
    def max_slope(self) -> float:
        return float(np.sum(np.abs(self.amplitude) * np.linalg.norm(self.wave, axis=1)))


def _weighted_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """values @ weights over the last axis without BLAS: on the ray caster's tall, thin products BLAS's threads
    cost more than they give (2.5x the wall time on a busy 2-core machine), and a stacked matmul over strided
    rays is slower still."""
    total = values[..., 0] * weights[0]
    for k in range(1, len(weights)):
        total = total + values[..., k] * weights[k]
    return total


@dataclass(frozen=True)
class Boxes:
    """Boxes rotated by `yaw` about z: buildings, cars, walls, fences, containers."""

    center: np.ndarray  # (N, 3)
    half: np.ndarray  # (N, 3) half extents in the box frame
    yaw: np.ndarray  # (N,)
    albedo: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.yaw)

    @staticmethod
    def empty() -> "Boxes":
        return Boxes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0))

    @staticmethod
    def concat(parts: list["Boxes"]) -> "Boxes":
        return Boxes(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("center", "half", "yaw", "albedo")))

    def radius_xy(self) -> np.ndarray:
        return np.hypot(self.half[:, 0], self.half[:, 1])

    def signed_distance(self, points: np.ndarray) -> np.ndarray:
        """(M, N) exact box SDF: negative inside a box."""
        local = self._to_local(points)
        q = np.abs(local) - self.half[None]
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """(M, N) unsigned distance from each point to each box surface."""
        return np.abs(self.signed_distance(points))

    def _to_local(self, points: np.ndarray) -> np.ndarray:
        d = points[:, None, :] - self.center[None]
        c, s = np.cos(self.yaw)[None], np.sin(self.yaw)[None]
        return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2]], axis=-1)


@dataclass(frozen=True)
class Frustums:
    """Vertical solids whose radius goes linearly from r0 at z0 to r1 at z1: poles, trunks, crowns."""

    center: np.ndarray  # (N, 2)
    z0: np.ndarray
    z1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    albedo: np.ndarray

    def __len__(self) -> int:
        return len(self.z0)

    def radius_xy(self) -> np.ndarray:
        return np.maximum(self.r0, self.r1)

    def distance(self, points: np.ndarray) -> np.ndarray:
        """(M, N) distance to the surface: in the (rho, z) half-plane the solid is a trapezoid."""
        rho = np.linalg.norm(points[:, None, :2] - self.center[None], axis=-1)
        z = np.broadcast_to(points[:, 2:3], rho.shape)
        zero = np.zeros_like(self.r0)
        bottom = _segment_distance(rho, z, zero, self.z0, self.r0, self.z0)
        side = _segment_distance(rho, z, self.r0, self.z0, self.r1, self.z1)
        top = _segment_distance(rho, z, zero, self.z1, self.r1, self.z1)
        return np.minimum(np.minimum(bottom, side), top)


def _segment_distance(px, py, ax, ay, bx, by) -> np.ndarray:
    """Distance from 2-D points (px, py) to segments a-b, broadcast over (M, N)."""
    dx, dy = bx - ax, by - ay
    length2 = np.maximum(dx * dx + dy * dy, 1e-18)
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / length2, 0.0, 1.0)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


@dataclass(frozen=True)
class World:
    """The static scene plus the road grid that trajectories drive on."""

    config: WorldConfig
    ground: Ground
    boxes: Boxes
    frustums: Frustums
    road_x: np.ndarray  # x of the north-south road centre lines
    road_y: np.ndarray  # y of the east-west road centre lines
    road_width: float
    labels: dict[str, int] = field(default_factory=dict)  # primitive counts per kind, for reports

    def node_xy(self, i: int, j: int) -> np.ndarray:
        return np.array([self.road_x[i], self.road_y[j]])

    def surface_distance(self, points: np.ndarray, extra: Boxes | None = None) -> np.ndarray:
        """Distance from each world point to the nearest surface (ground measured vertically)."""
        ground = np.abs(points[:, 2] - self.ground.height(points[:, :2]))
        boxes = self.boxes if extra is None else Boxes.concat([self.boxes, extra])
        objects = np.empty(len(points))
        for start in range(0, len(points), 2048):  # bounded (M, N) memory
            chunk = points[start : start + 2048]
            box = boxes.distance(chunk).min(axis=1, initial=np.inf)
            objects[start : start + len(chunk)] = np.minimum(box, self.frustums.distance(chunk).min(axis=1, initial=np.inf))
        return np.minimum(ground, objects)


def build_world(config: WorldConfig) -> World:
    """Lay out roads, then fill blocks with lots, buildings and fences, then line roads with furniture."""
    rng = np.random.default_rng([config.seed, 0x5EED])
    style = STYLE_PARAMS[config.style]
    road_x = np.concatenate([[0.0], np.cumsum(rng.uniform(*style.block, config.blocks_x))])
    road_y = np.concatenate([[0.0], np.cumsum(rng.uniform(*style.block, config.blocks_y))])
    ground = _ground(rng, config.ground_amplitude_m, config.ground_float32)
    half_road = style.road_width / 2
    box_parts: list[Boxes] = []
    for i in range(config.blocks_x):
        for j in range(config.blocks_y):
            lo = np.array([road_x[i], road_y[j]]) + half_road + 2.0  # 2 m sidewalk
            hi = np.array([road_x[i + 1], road_y[j + 1]]) - half_road - 2.0
            box_parts.extend(_block(rng, style, ground, lo, hi))
    poles, trees, cars = _street_furniture(rng, style, ground, road_x, road_y)
    box_parts.append(cars)
    boxes = Boxes.concat(box_parts)
    frustums = Frustums(*(np.concatenate([getattr(p, n) for p in (poles, trees)]) for n in ("center", "z0", "z1", "r0", "r1", "albedo")))
    labels = {"boxes": len(boxes), "parked_cars": len(cars), "poles": len(poles), "tree_parts": len(trees)}
    return World(config, ground, boxes, frustums, road_x, road_y, style.road_width, labels)


def _ground(rng: np.random.Generator, amplitude: float, float32: bool) -> Ground:
    """A few long waves (40-150 m) so slopes stay road-like (a few percent)."""
    k = 4
    wavelength = rng.uniform(40.0, 150.0, k)
    angle = rng.uniform(0, 2 * np.pi, k)
    wave = (2 * np.pi / wavelength)[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    weights = rng.dirichlet(np.ones(k))
    return Ground(amplitude * weights, wave, rng.uniform(0, 2 * np.pi, k), float32=float32)


def _split(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, lot: tuple[float, float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Guillotine-split a rectangle into lots whose sides fall in (roughly) the lot range."""
    size = hi - lo
    axis = int(np.argmax(size))
    if size[axis] <= lot[1]:
        return [(lo, hi)]
    low, high = max(lot[0], size[axis] * 0.3), min(size[axis] - lot[0], size[axis] * 0.7)
    cut = rng.uniform(low, high) if low < high else size[axis] / 2
    mid_hi, mid_lo = hi.copy(), lo.copy()
    mid_hi[axis] = mid_lo[axis] = lo[axis] + cut
    return _split(rng, lo, mid_hi, lot) + _split(rng, mid_lo, hi, lot)


def _block(rng: np.random.Generator, style: StyleParams, ground: Ground, lo: np.ndarray, hi: np.ndarray) -> list[Boxes]:
    """Buildings on lots, fences on lot boundaries, an optional perimeter wall with gates."""
    lots = _split(rng, lo, hi, style.lot)
    centers, halves, yaws, albedo = [], [], [], []
    for lot_lo, lot_hi in lots:
        if rng.random() < style.empty_lot:
            continue
        inset = rng.uniform(*style.setback, 4)
        b_lo, b_hi = lot_lo + inset[:2], lot_hi - inset[2:]
        if np.any(b_hi - b_lo < 3.0):
            continue
        yaw = np.radians(rng.uniform(-style.yaw_jitter_deg, style.yaw_jitter_deg))
        half_xy = (b_hi - b_lo) / 2 / (np.abs(np.cos(yaw)) + np.abs(np.sin(yaw)))  # stays inside the lot when rotated
        height = rng.uniform(*style.height)
        center_xy = (b_lo + b_hi) / 2
        base = ground.height(center_xy[None])[0] - 2.0  # foundations below the rolling ground
        centers.append([*center_xy, base + (height + 2.0) / 2])
        halves.append([*half_xy, (height + 2.0) / 2])
        yaws.append(yaw)
        albedo.append(rng.uniform(0.2, 0.8))
    parts = [Boxes(np.array(centers).reshape(-1, 3), np.array(halves).reshape(-1, 3), np.array(yaws), np.array(albedo))]
    parts.append(_thin_walls(rng, ground, _lot_edges(lots, lo, hi), style.fence, (1.0, 1.8), gap=0.0))
    perimeter = [((lo[0], lo[1]), (hi[0], lo[1])), ((hi[0], lo[1]), (hi[0], hi[1])), ((hi[0], hi[1]), (lo[0], hi[1])), ((lo[0], hi[1]), (lo[0], lo[1]))]
    parts.append(_thin_walls(rng, ground, perimeter, style.wall, (2.0, 3.0), gap=8.0))
    return parts


def _lot_edges(lots: list[tuple[np.ndarray, np.ndarray]], lo: np.ndarray, hi: np.ndarray) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Lot sides that are interior to the block (boundaries between neighbours)."""
    edges = set()
    for a, b in lots:
        for p, q in (((a[0], a[1]), (b[0], a[1])), ((b[0], a[1]), (b[0], b[1])), ((a[0], b[1]), (b[0], b[1])), ((a[0], a[1]), (a[0], b[1]))):
            on_border = (p[0] == q[0] and p[0] in (lo[0], hi[0])) or (p[1] == q[1] and p[1] in (lo[1], hi[1]))
            if not on_border:
                edges.add((p, q))
    return sorted(edges)


def _thin_walls(rng: np.random.Generator, ground: Ground, segments: list, probability: float, height: tuple[float, float], gap: float) -> Boxes:
    """0.2 m thick boxes along segments, each kept with `probability`; a gate of `gap` metres mid-way."""
    centers, halves, yaws = [], [], []
    for p, q in segments:
        if rng.random() >= probability:
            continue
        p, q = np.asarray(p, float), np.asarray(q, float)
        length = float(np.linalg.norm(q - p))
        direction = (q - p) / max(length, 1e-9)
        pieces = [(0.0, length)] if gap <= 0 or length < 3 * gap else [(0.0, length / 2 - gap / 2), (length / 2 + gap / 2, length)]
        h = rng.uniform(*height)
        for s0, s1 in pieces:
            mid = p + direction * (s0 + s1) / 2
            z = ground.height(mid[None])[0]
            centers.append([*mid, z + h / 2 - 0.5])
            halves.append([(s1 - s0) / 2, 0.1, h / 2 + 0.5])
            yaws.append(np.arctan2(direction[1], direction[0]))
    n = len(yaws)
    return Boxes(np.array(centers).reshape(-1, 3), np.array(halves).reshape(-1, 3), np.array(yaws), np.full(n, 0.5))


def _street_furniture(rng: np.random.Generator, style: StyleParams, ground: Ground, road_x: np.ndarray, road_y: np.ndarray) -> tuple[Frustums, Frustums, Boxes]:
    """Poles and trees on the sidewalks and parked cars at the curbs of every road edge."""
    half_road = style.road_width / 2
    pole_xy, tree_xy, car_xy, car_yaw = [], [], [], []
    edges = [((road_x[i], y), (road_x[i + 1], y)) for y in road_y for i in range(len(road_x) - 1)]
    edges += [((x, road_y[j]), (x, road_y[j + 1])) for x in road_x for j in range(len(road_y) - 1)]
    clearance = half_road + 4.0  # keep intersections open
    for p, q in edges:
        p, q = np.asarray(p), np.asarray(q)
        length = float(np.linalg.norm(q - p))
        u = (q - p) / length
        normal = np.array([u[1], -u[0]])
        for side in (-1.0, 1.0):
            for spacing, offset, out in ((style.pole_spacing, half_road + 0.8, pole_xy), (style.tree_spacing, half_road + 1.5, tree_xy)):
                s = clearance + rng.uniform(0, spacing[0])
                while s < length - clearance:
                    out.append(p + u * s + normal * side * offset)
                    s += rng.uniform(*spacing)
            slots = np.arange(clearance + 3.5, length - clearance - 3.5, 7.0)
            for s in slots[rng.random(len(slots)) < style.parked_car]:
                car_xy.append(p + u * (s + rng.uniform(-0.8, 0.8)) + normal * side * (half_road - 1.0))
                car_yaw.append(np.arctan2(u[1], u[0]) + rng.normal(0, 0.03))
    poles = _frustums(ground, np.array(pole_xy).reshape(-1, 2), 0.0, rng.uniform(6, 9, len(pole_xy)), 0.12, 0.1, 0.7)
    trees = _trees(rng, ground, np.array(tree_xy).reshape(-1, 2))
    cars = car_boxes(rng, ground, np.array(car_xy).reshape(-1, 2), np.array(car_yaw))
    return poles, trees, cars


def _frustums(ground: Ground, xy: np.ndarray, z0, z1, r0, r1, albedo) -> Frustums:
    """Frusta with z0/z1 given relative to the local ground (the base is sunk 0.5 m)."""
    n = len(xy)
    g = ground.height(xy) if n else np.zeros(0)
    z0, z1, r0, r1, albedo = (np.broadcast_to(np.asarray(v, float), (n,)).copy() for v in (z0, z1, r0, r1, albedo))
    return Frustums(xy, np.where(z0 <= 0.0, g - 0.5, g + z0), g + z1, r0, r1, albedo)


def _trees(rng: np.random.Generator, ground: Ground, xy: np.ndarray) -> Frustums:
    """A trunk cylinder plus a crown that is either a cone (conifer) or a wide frustum (broadleaf)."""
    n = len(xy)
    trunk_h = rng.uniform(1.8, 3.0, n)
    top = trunk_h + rng.uniform(3.0, 8.0, n)
    conifer = rng.random(n) < 0.4
    crown_r = rng.uniform(1.5, 3.5, n)
    trunks = _frustums(ground, xy, 0.0, trunk_h + 0.3, rng.uniform(0.15, 0.3, n), 0.12, 0.35)
    crowns = _frustums(ground, xy, trunk_h, top, crown_r, np.where(conifer, 0.0, crown_r * 0.5), 0.45)
    return Frustums(*(np.concatenate([getattr(trunks, k), getattr(crowns, k)]) for k in ("center", "z0", "z1", "r0", "r1", "albedo")))


def car_boxes(rng: np.random.Generator, ground: Ground, xy: np.ndarray, yaw: np.ndarray) -> Boxes:
    """Car-sized boxes (about 4.5 x 1.8 x 1.5 m) standing on the ground; also used for traffic."""
    n = len(xy)
    size = np.stack([rng.uniform(4.0, 5.0, n), rng.uniform(1.7, 1.95, n), rng.uniform(1.4, 1.9, n)], axis=1)
    g = ground.height(xy) if n else np.zeros(0)
    center = np.column_stack([xy, g + size[:, 2] / 2]) if n else np.zeros((0, 3))
    return Boxes(center, size / 2, yaw.astype(float), rng.uniform(0.3, 0.9, n))
