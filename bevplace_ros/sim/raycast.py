"""Analytic ray intersections, vectorised over (ray, primitive) pairs.

Each function takes per-pair arrays (origin o, unit direction d, primitive parameters) and returns
the first positive hit distance `t` (inf where there is none) and the outward surface normal, so
the LiDAR can take the nearest hit per ray with one `np.minimum.at`.
"""

from __future__ import annotations

import numpy as np

from bevplace_ros.sim.world import Ground

_EPS = 1e-6


def ray_boxes(o: np.ndarray, d: np.ndarray, center: np.ndarray, half: np.ndarray, yaw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slab test in each box's own frame; rays starting inside a box report no hit."""
    c, s = np.cos(yaw), np.sin(yaw)
    rel = o - center

    def local(v: np.ndarray) -> np.ndarray:
        return np.stack([c * v[:, 0] + s * v[:, 1], -s * v[:, 0] + c * v[:, 1], v[:, 2]], axis=1)

    lo, ld = local(rel), local(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / ld
        t1, t2 = (-half - lo) * inv, (half - lo) * inv
    t1 = np.where(np.isnan(t1), -np.inf, t1)  # parallel ray exactly on a slab plane
    t2 = np.where(np.isnan(t2), np.inf, t2)
    near_axis = np.minimum(t1, t2)
    t_near = near_axis.max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    hit = (t_near <= t_far) & (t_near > _EPS)
    axis = near_axis.argmax(axis=1)
    rows = np.arange(len(o))
    normal_local = np.zeros_like(lo)
    normal_local[rows, axis] = -np.sign(ld[rows, axis])
    normal = np.stack([c * normal_local[:, 0] - s * normal_local[:, 1], s * normal_local[:, 0] + c * normal_local[:, 1], normal_local[:, 2]], axis=1)
    return np.where(hit, t_near, np.inf), normal


def ray_frustums(
    o: np.ndarray, d: np.ndarray, center: np.ndarray, z0: np.ndarray, z1: np.ndarray, r0: np.ndarray, r1: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Quadratic for the side rho = r(z) (valid where z0 <= z <= z1 and r >= 0) plus the two caps."""
    k = (r1 - r0) / (z1 - z0)
    px, py = o[:, 0] - center[:, 0], o[:, 1] - center[:, 1]
    w = r0 + k * (o[:, 2] - z0)
    kd = k * d[:, 2]
    a = d[:, 0] ** 2 + d[:, 1] ** 2 - kd**2
    b = 2.0 * (px * d[:, 0] + py * d[:, 1] - w * kd)
    cc = px**2 + py**2 - w**2
    disc = b * b - 4.0 * a * cc
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.maximum(disc, 0.0))
        linear = np.abs(a) < 1e-12
        roots = np.stack([np.where(linear, -cc / b, (-b - root) / (2 * a)), np.where(linear, np.inf, (-b + root) / (2 * a))], axis=1)
        roots = np.where((disc >= 0)[:, None], roots, np.inf)
        z = o[:, 2:3] + roots * d[:, 2:3]
        valid = (roots > _EPS) & (z >= z0[:, None]) & (z <= z1[:, None]) & (w[:, None] + kd[:, None] * roots >= 0)
        t_side = np.where(valid, roots, np.inf).min(axis=1)
        caps = []
        for zc, rc in ((z0, r0), (z1, r1)):
            tc = (zc - o[:, 2]) / d[:, 2]
            rho2 = (px + tc * d[:, 0]) ** 2 + (py + tc * d[:, 1]) ** 2
            caps.append(np.where((tc > _EPS) & (rho2 <= rc**2) & np.isfinite(tc), tc, np.inf))
    t = np.minimum(t_side, np.minimum(caps[0], caps[1]))
    side_t = np.where(np.isfinite(t_side), t_side, 0.0)
    radial = np.stack([px + side_t * d[:, 0], py + side_t * d[:, 1]], axis=1)
    radial /= np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-12)
    side_normal = np.column_stack([radial, -k]) / np.sqrt(1.0 + k**2)[:, None]
    normal = np.where((t == t_side)[:, None], side_normal, 0.0)
    normal[:, 2] = np.where(t == caps[0], -1.0, np.where(t == caps[1], 1.0, normal[:, 2]))
    return t, normal


def ray_ground(o: np.ndarray, d: np.ndarray, ground: Ground, t_min: float, t_max: float, samples: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """First crossing of the height field, bracketed by the slab |z| <= sum|a_k| the ground lives in.

    Rays steeper than the steepest slope cross it exactly once inside the slab, so the slab is a
    valid bracket; shallower rays march a few samples first to bracket the first crossing.
    """
    ceiling = float(np.sum(np.abs(ground.amplitude)))
    with np.errstate(divide="ignore"):
        enter = np.where(d[:, 2] < 0, (o[:, 2] - ceiling) / -d[:, 2], t_min)
        leave = np.where(d[:, 2] < 0, (o[:, 2] + ceiling) / -d[:, 2], np.inf)
    lo = np.clip(enter, t_min, t_max)
    hi = np.clip(leave, t_min, t_max)

    def above(t: np.ndarray, rays: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Height of the ray point above the ground at parameter t."""
        p = o[rays, None, :] + t[..., None] * d[rays, None, :]
        return p[..., 2] - ground.height(p[..., :2])

    shallow = np.flatnonzero(d[:, 2] >= -ground.max_slope)
    if shallow.size:
        steps = lo[shallow, None] + (hi[shallow] - lo[shallow])[:, None] * np.linspace(0.0, 1.0, samples)[None]
        below = above(steps, shallow) < 0
        first = below.argmax(axis=1)
        rows = np.arange(shallow.size)
        lo[shallow] = np.where(below.any(axis=1), steps[rows, np.maximum(first - 1, 0)], 0.0)
        hi[shallow] = np.where(below.any(axis=1), steps[rows, first], 0.0)
    f_lo, f_hi = above(lo[:, None])[:, 0], above(hi[:, None])[:, 0]
    hit = (hi > lo) & (f_hi < 0) & (f_lo >= 0)
    t = np.full(len(o), np.inf)
    t[hit] = _illinois(lambda x, rays: above(x[:, None], rays)[:, 0], np.flatnonzero(hit), lo[hit], hi[hit], f_lo[hit], f_hi[hit])
    normal = np.zeros((len(o), 3))
    normal[:, 2] = 1.0  # rays that miss the ground keep no normal of it (only hits are ever shaded)
    p = o[hit] + t[hit, None] * d[hit]
    normal[hit, :2] = -ground.gradient(p[:, :2])
    return t, normal / np.linalg.norm(normal, axis=1, keepdims=True)


def _illinois(f, rays: np.ndarray, lo: np.ndarray, hi: np.ndarray, f_lo: np.ndarray, f_hi: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Bracketed root of f(t, rays) by the Illinois false-position method (superlinear, never leaves the bracket).

    The ground is nearly planar inside a bracket, so a handful of secant steps reach float precision.
    """
    side = np.zeros(len(rays))
    x = lo
    for _ in range(iterations):
        denom = f_hi - f_lo
        x = np.where(denom != 0, (lo * f_hi - hi * f_lo) / np.where(denom != 0, denom, 1.0), lo)
        fx = f(x, rays)
        positive = fx > 0
        lo, f_lo = np.where(positive, x, lo), np.where(positive, fx, f_lo)
        hi, f_hi = np.where(positive, hi, x), np.where(positive, f_hi, fx)
        f_hi = np.where(positive & (side > 0), f_hi / 2, f_hi)  # same end kept twice: halve its weight
        f_lo = np.where(~positive & (side < 0), f_lo / 2, f_lo)
        side = np.where(positive, 1.0, -1.0)
    return x
