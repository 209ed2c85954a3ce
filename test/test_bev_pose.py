"""3-DoF BEV pose: RANSAC geometry on exact data, and the full path on a synthetic KITTI pair."""

from __future__ import annotations

import numpy as np
import pytest

from bevplace_ros.bev_pose import BEVKeypoints, BEVPose, BEVPoseConfig, estimate_pose, fit_rigid_2d, ransac_rigid_2d
from bevplace_ros.models.checkpoint import EQUIVARIANT
from bevplace_ros.place_recognizer import PlaceRecognizer, PlaceRecognizerConfig
from bevplace_ros.se3 import invert, matrix_to_xyyaw, transform_points, xyyaw_to_matrix


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_ransac_recovers_motion_despite_70_percent_outliers(rng):
    src = rng.uniform(-30, 30, (100, 2))
    T = xyyaw_to_matrix(4.0, -2.5, np.radians(133.0))
    dst = src @ T[:2, :2].T + T[:2, 3]
    dst[30:] = rng.uniform(-30, 30, (70, 2))
    inliers = ransac_rigid_2d(src, dst, BEVPoseConfig())
    assert inliers[:30].all() and inliers[30:].sum() <= 2
    R, t = fit_rigid_2d(src[:30], dst[:30])
    np.testing.assert_allclose(R, T[:2, :2], atol=1e-9)
    np.testing.assert_allclose(t, T[:2, 3], atol=1e-9)


def test_pose_convention_maps_b_into_a(rng):
    """Keypoints of a at p_a, of b at p_b = T_b_a p_a: the estimate must be T_a_b."""
    xy_a = rng.uniform(-25, 25, (40, 2))
    T_a_b = xyyaw_to_matrix(1.5, 2.0, np.radians(-40.0))
    xy_b = xy_a @ invert(T_a_b)[:2, :2].T + invert(T_a_b)[:2, 3]
    desc = rng.standard_normal((40, 16)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    est = estimate_pose(BEVKeypoints(xy_a, desc), BEVKeypoints(xy_b, desc[::-1][::-1]), BEVPoseConfig())
    assert est is not None and est.inliers == 40 and est.matches == 40
    np.testing.assert_allclose(est.matrix(), T_a_b, atol=1e-9)


def test_too_few_matches_gives_none():
    empty = BEVKeypoints(np.zeros((0, 2)), np.zeros((0, 128), dtype=np.float32))
    assert estimate_pose(empty, empty, BEVPoseConfig()) is None


def test_config_validation():
    with pytest.raises(ValueError, match="min_inliers"):
        BEVPoseConfig(min_inliers=1)
    with pytest.raises(ValueError, match="inlier_threshold_m"):
        BEVPoseConfig(inlier_threshold_m=0.0)


@pytest.mark.parametrize("x, y, yaw_deg", [(2.0, -1.5, 17.0), (3.3, 1.2, 133.0), (0.7, 0.4, -71.0)])
def test_recovers_known_planar_motion_of_a_kitti_scan(shared_data, x, y, yaw_deg):
    """Scan b is scan a seen from a sensor moved by T_a_b; both rasterised independently.
    The network is UNTRAINED (seeded): equivariant features alone carry the matching here."""
    recognizer = PlaceRecognizer(PlaceRecognizerConfig(model=EQUIVARIANT, weights="random"))
    scan_a = np.fromfile(shared_data / "kitti_scans" / "000000.bin", dtype=np.float32).reshape(-1, 4)
    T_a_b = xyyaw_to_matrix(x, y, np.radians(yaw_deg))
    scan_b = transform_points(invert(T_a_b), scan_a)
    pose = recognizer.relative_pose(recognizer.describe(scan_a), recognizer.describe(scan_b))
    assert isinstance(pose, BEVPose)
    ex, ey, eyaw = matrix_to_xyyaw(pose.matrix())
    assert np.hypot(ex - x, ey - y) < 0.3, (ex, ey, pose)
    assert abs(np.degrees(np.angle(np.exp(1j * (eyaw - np.radians(yaw_deg)))))) < 1.0, pose
