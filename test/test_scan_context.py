"""Scan Context baseline: grid layout, rotation invariance, retrieval and loop search."""

from __future__ import annotations

import numpy as np
import pytest

from bevplace_ros.baselines.scan_context import (
    ScanContextConfig,
    ring_keys,
    sc_distance,
    sc_loop_matches,
    sc_top_k,
    scan_context,
    scan_context_from_bev,
)
from bevplace_ros.bev import BEVConfig, make_bev


def _scene(rng: np.random.Generator, n_objects: int = 25) -> np.ndarray:
    """Vertical pillars of random height around the sensor: distinctive per seed."""
    centres = rng.uniform(-60, 60, size=(n_objects, 2))
    heights = rng.uniform(0.5, 6.0, size=n_objects)
    pts = []
    for (x, y), h in zip(centres, heights):
        z = np.linspace(-1.9, h - 2.0, 12)
        pts.append(np.column_stack([np.full_like(z, x) + rng.normal(0, 0.2, z.size), np.full_like(z, y) + rng.normal(0, 0.2, z.size), z]))
    return np.concatenate(pts)


def _yaw(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.column_stack([c * points[:, 0] - s * points[:, 1], s * points[:, 0] + c * points[:, 1], points[:, 2]])


def test_cell_of_a_point_holds_its_height_above_ground():
    cfg = ScanContextConfig()
    desc = scan_context(np.array([[10.0, 0.0, 0.5], [10.0, 0.0, -0.5]]), cfg)
    assert desc.shape == (20, 60)
    ring, sector = int(10.0 / 80.0 * 20), int(np.pi / (2 * np.pi) * 60)  # angle 0 -> +pi shift
    assert desc[ring, sector] == pytest.approx(2.5)  # max of the two heights, z + 2 m
    assert np.count_nonzero(desc) == 1


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="points"):
        scan_context(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="sectors"):
        ScanContextConfig(sectors=0)


def test_distance_is_rotation_invariant_and_separates_places(rng):
    cfg = ScanContextConfig()
    scene = _scene(rng)
    base = scan_context(scene, cfg)
    rotated = scan_context(_yaw(scene, np.deg2rad(6.0 * 17)), cfg)  # 17 sectors of 6 deg
    other = scan_context(_scene(np.random.default_rng(99)), cfg)
    np.testing.assert_allclose(ring_keys(base), ring_keys(rotated), atol=1e-6)
    d = sc_distance(base, np.stack([rotated, other]), cfg)
    assert d[0] < 1e-6
    assert d[1] > 0.3


def test_top_k_retrieves_the_rotated_copy(rng):
    cfg = ScanContextConfig()
    scenes = [_scene(np.random.default_rng(s)) for s in range(12)]
    database = np.stack([scan_context(s, cfg) for s in scenes])
    queries = np.stack([scan_context(_yaw(scenes[i], rng.uniform(-np.pi, np.pi)), cfg) for i in (3, 7)])
    top = sc_top_k(database, queries, k=2, cfg=cfg)
    assert top.shape == (2, 2)
    np.testing.assert_array_equal(top[:, 0], [3, 7])


def test_loop_matches_respect_exclusion_and_find_the_revisit():
    cfg = ScanContextConfig()
    scenes = [_scene(np.random.default_rng(s)) for s in range(8)]
    sequence = np.stack([scan_context(s, cfg) for s in scenes] + [scan_context(_yaw(scenes[2], 1.0), cfg)])
    matches = sc_loop_matches(sequence, exclude_recent=3, cfg=cfg)
    assert (matches.match[:4] == -1).all() and np.isinf(matches.distance[:4]).all()
    assert (matches.match[4:] < np.arange(4, 9) - 3).all()
    assert matches.match[8] == 2


def test_from_bev_image_matches_the_raw_layout(rng):
    bev = BEVConfig()
    scene = _scene(rng)
    scene = scene[np.abs(scene[:, :2]).max(axis=1) < 25]
    from_image = scan_context_from_bev(make_bev(scene, bev), bev, ScanContextConfig(max_range_m=30.0))
    from_points = scan_context(scene, ScanContextConfig(max_range_m=30.0))
    assert from_image.shape == (20, 60)
    assert ((from_image > 0) == (from_points > 0)).mean() > 0.95  # same occupied polar cells up to cell borders
