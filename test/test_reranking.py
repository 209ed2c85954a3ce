"""Re-ranking by BEV geometry, one network pass per keyframe, and the place map's versioned file."""

from __future__ import annotations

import numpy as np
import pytest

from bevplace_ros.bev import BEVConfig
from bevplace_ros.bev_pose import BEVKeypoints, BEVPoseConfig
from bevplace_ros.datasets.kitti import read_kitti_scan
from bevplace_ros.loop_detector import LoopDetectorConfig, rerank
from bevplace_ros.models.checkpoint import EQUIVARIANT
from bevplace_ros.place_map import PlaceMap, PlaceMapConfig, PlaceMapError
from bevplace_ros.se3 import invert, transform_points, xyyaw_to_matrix
from bevplace_ros.versioned_npz import save_versioned_npz

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _keypoints(rng, n: int = 60) -> BEVKeypoints:
    desc = rng.standard_normal((n, 32)).astype(np.float32)
    return BEVKeypoints(rng.uniform(-25, 25, (n, 2)), desc / np.linalg.norm(desc, axis=1, keepdims=True))


def _moved(kp: BEVKeypoints, T_a_b: np.ndarray, keep: int) -> BEVKeypoints:
    """The first `keep` keypoints of kp seen from a sensor at T_a_b, the rest replaced by clutter."""
    xy = kp.xy @ invert(T_a_b)[:2, :2].T + invert(T_a_b)[:2, 3]
    xy[keep:] = np.random.default_rng(1).uniform(-25, 25, (len(xy) - keep, 2))
    return BEVKeypoints(xy, kp.descriptors)


def test_rerank_orders_by_inliers_rejects_weak_and_keeps_unscored_last(rng):
    query = _keypoints(rng)
    T = xyyaw_to_matrix(1.0, -2.0, np.radians(30.0))
    strong, weak, unrelated = _moved(query, T, 50), _moved(query, T, 20), _keypoints(rng)
    matches = [unrelated, weak, None, strong]
    cfg = LoopDetectorConfig(rerank_k=10, min_inliers=8)
    order, poses = rerank(query, matches, np.array([0.1, 0.2, 0.3, 0.9]), cfg, BEVPoseConfig())
    assert list(order) == [3, 1, 2]  # strong before weak despite its worse descriptor distance; unrelated rejected; None last
    assert poses[3].inliers == 50 and poses[1].inliers == 20 and poses[2] is None
    np.testing.assert_allclose(poses[3].matrix(), invert(T), atol=1e-6)  # T_match_query
    off, _ = rerank(query, matches, np.array([0.1, 0.2, 0.3, 0.9]), LoopDetectorConfig(rerank_k=0), BEVPoseConfig())
    assert list(off) == [0, 1, 2, 3]


def test_packed_keypoints_are_float16_and_round_trip(rng):
    kp = _keypoints(rng)
    packed = kp.packed()
    assert packed.dtype == np.float16 and packed.shape == (60, 34) and packed.nbytes == 60 * 34 * 2
    back = BEVKeypoints.unpack(packed)
    np.testing.assert_allclose(back.xy, kp.xy, atol=0.02)
    np.testing.assert_allclose(back.descriptors, kp.descriptors, atol=1e-3)
    with pytest.raises(ValueError, match="2 \\+ C"):
        BEVKeypoints.unpack(np.zeros((3, 2), np.float16))


@pytest.fixture(scope="module")
def scans(shared_data) -> list[np.ndarray]:
    return [read_kitti_scan(shared_data / "kitti_scans" / "000000.bin"), read_kitti_scan(shared_data / "kitti_scans_more" / "000198.bin"),
            read_kitti_scan(shared_data / "kitti_scans_more" / "000094.bin")]


def _map(**detection) -> PlaceMap:
    return PlaceMap(PlaceMapConfig(model=EQUIVARIANT, weights="random", device="cpu"), BEVConfig(),
                    LoopDetectorConfig(exclude_recent=0, exclude_seconds=0.0, **detection))


def test_detector_runs_the_network_once_per_keyframe_and_reranks_by_geometry(scans):
    """Untrained network (seeded): the true place must come first by inliers and carry the right pose."""
    place_map = _map(rerank_k=10, min_inliers=8)
    calls = []
    recognizer = place_map.detector.recognizer
    describe_images = recognizer.describe_images
    recognizer.describe_images = lambda images: calls.append(len(images)) or describe_images(images)  # spy: counts, then runs the real network
    for i, scan in enumerate(scans):
        place_map.add_keyframe(float(i), scan, np.eye(4))
    T = xyyaw_to_matrix(2.0, -1.0, np.radians(40.0))
    query = place_map.add_keyframe(10.0, transform_points(invert(T), scans[0]), np.eye(4))
    assert calls == [1, 1, 1, 1]  # one pass per keyframe, none for the candidates
    best = query.candidates[0]
    assert best.match_id == 0 and best.rank == 0 and best.bev is not None and best.bev.inliers >= 8
    np.testing.assert_allclose(best.bev.matrix()[:2, 3], T[:2, 3], atol=0.3)
    assert all(c.bev is None or c.bev.inliers >= 8 for c in query.candidates)
    assert [c.bev.inliers for c in query.candidates if c.bev] == sorted([c.bev.inliers for c in query.candidates if c.bev], reverse=True)


def test_place_map_saves_keypoints_and_refuses_version_1_maps(scans, tmp_path):
    place_map = _map()
    for i, scan in enumerate(scans[:2]):
        place_map.add_keyframe(float(i), scan, np.eye(4))
    path = place_map.save(tmp_path / "map.npz")
    loaded = _map()
    loaded.load(path)
    assert loaded.size == 2 and loaded.detector.keypoints.keys() == [0, 1]
    np.testing.assert_array_equal(loaded.detector.keypoints.get(1), place_map.detector.keypoints.get(1))
    old = save_versioned_npz(tmp_path / "old.npz", "bevplace_ros.place_map", 1, {"bevs": np.zeros((1, 151, 151), np.uint8)})
    with pytest.raises(PlaceMapError, match="version 1 maps hold BEV images.*replay"):
        loaded.load(old)
    assert loaded.size == 2  # unchanged


def test_config_refuses_negative_reranking():
    with pytest.raises(ValueError, match="rerank_k"):
        LoopDetectorConfig(rerank_k=-1)


def test_offline_reranking_moves_the_geometric_match_to_the_top(rng):
    """Evaluation's re-ranking: the descriptor's first choice is a different place; geometry wins."""
    from bevplace_ros.evaluation.place_metrics import descriptor_loop_top_k, reranked_loop_matches, rerank_rows

    places = [_keypoints(rng) for _ in range(3)]
    revisit = _moved(places[1], xyyaw_to_matrix(2.0, 1.0, np.radians(-120.0)), 45)
    keypoints = [*places, revisit]
    descriptors = np.eye(4, dtype=np.float32)
    descriptors[3] = np.array([0.9, 0.3, 0.0, 0.3]) / np.linalg.norm([0.9, 0.3, 0.0, 0.3])  # nearest: place 0, then 1
    cfg, pose_cfg = LoopDetectorConfig(rerank_k=3), BEVPoseConfig()
    rows, dist = descriptor_loop_top_k(descriptors, exclude_recent=0, k=3)
    assert rows[3, 0] == 0 and rows[0, 0] == -1  # the first frame has no older one
    ranked, score = rerank_rows(rows[3:], dist[3:], [revisit], keypoints, cfg, pose_cfg)
    assert ranked[0, 0] == 1 and 44 <= score[0] <= 45
    matches = reranked_loop_matches(rows, dist, keypoints, cfg, pose_cfg)
    assert matches.match[3] == 1 and matches.match[0] == -1 and np.isinf(matches.distance[0])
