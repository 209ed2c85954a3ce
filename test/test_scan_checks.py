"""Degenerate scans are refused with a named reason; sparse real ones (16 beams) still pass."""

from __future__ import annotations

import numpy as np
import pytest
from rclpy.parameter import Parameter
from std_msgs.msg import Header

from bevplace_ros.bev import BEVConfig
from bevplace_ros.nodes.conversions import ns_to_stamp, xyzi_cloud
from bevplace_ros.scan_checks import ScanCheckConfig, check_scan
from bevplace_ros.se3 import make_transform
from bevplace_ros.sim.lidar import LidarConfig, scan
from bevplace_ros.sim.world import STYLES, WorldConfig, build_world

VLP16 = LidarConfig(beams=16, columns=900, fov_up_deg=15.0, fov_down_deg=-15.0)


def _xyz(points: np.ndarray) -> np.ndarray:
    return np.column_stack([points["x"], points["y"], points["z"]]).astype(np.float32)


@pytest.mark.parametrize("style", STYLES)
def test_a_simulated_16_beam_scan_passes_the_defaults(style):
    world = build_world(WorldConfig(seed=5, style=style))
    xy = np.array([world.road_x[1] + 20.0, world.road_y[1] + 2.0])
    pose = make_transform(np.eye(3), [xy[0], xy[1], world.ground.height(xy[None])[0] + 1.73])
    points = _xyz(scan(world, pose, VLP16, np.random.default_rng(0)))
    assert check_scan(points, ScanCheckConfig(), BEVConfig()) is None
    # and the margin is real: the same scan fails a threshold a few times the default
    assert check_scan(points, ScanCheckConfig(min_bev_cells=20 * ScanCheckConfig.min_bev_cells), BEVConfig()).reason == "sparse bev"


def test_real_kitti_scans_and_their_16_beam_subsets_pass(shared_data):
    """Every 4th of the HDL-64's rings (by elevation) leaves a VLP-16-like scan of the same street."""
    for path in sorted((shared_data / "kitti_scans").glob("*.bin")):
        points = np.fromfile(path, dtype=np.float32).reshape(-1, 4)
        elevation = np.degrees(np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1])))
        ring = np.clip(np.round((elevation + 24.8) / (26.8 / 63)), 0, 63).astype(int)
        for subset in (points, points[ring % 4 == 0]):
            assert check_scan(subset, ScanCheckConfig(), BEVConfig()) is None, path.name


@pytest.mark.parametrize("points, reason", [
    (np.zeros((20_000, 4), np.float32), "all near sensor"),  # a driver emitting zeros
    (np.random.default_rng(0).normal(scale=0.3, size=(20_000, 4)).astype(np.float32), "all near sensor"),  # covered sensor
    (np.c_[np.random.default_rng(0).uniform(-30, 30, (20_000, 2)), np.full((20_000, 2), -8.0)].astype(np.float32), "sparse bev"),  # below the band
    (np.random.default_rng(0).uniform(-30, 30, (100, 4)).astype(np.float32), "too few points"),
])
def test_degenerate_scans_are_refused_with_a_named_reason(points, reason):
    rejection = check_scan(points, ScanCheckConfig(), BEVConfig())
    assert rejection is not None and rejection.reason == reason and rejection.detail


def test_a_scan_at_the_origin_never_reaches_the_database(ros_context):
    """Through the node's own processing path, from its subscription callback on."""
    from ros_helpers import handle_scan
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    node = PlaceRecognitionNode(context=ros_context, parameter_overrides=[Parameter("place.weights", value="random")])
    try:
        node.odometry.add(1.0, np.eye(4))
        node.odometry.add(2.0, np.eye(4))
        handle_scan(node, xyzi_cloud(Header(stamp=ns_to_stamp(10**9), frame_id="lidar"), np.zeros((20_000, 4), np.float32)))
        assert node.skipped == {"all near sensor": 1} and "0.000 m" in node.last_skip["all near sensor"]
        assert node.keyframes_published == 0 and node.map.size == 0
        assert node.set_parameters([Parameter("min_radius", value=0.0), Parameter("min_bev_cells", value=0)])[0].successful
        handle_scan(node, xyzi_cloud(Header(stamp=ns_to_stamp(2 * 10**9), frame_id="lidar"), np.zeros((20_000, 4), np.float32)))
        assert node.keyframes_published == 1, "with the checks off at runtime the same scan is a keyframe: the check is what refused it"
    finally:
        node.destroy_node()
