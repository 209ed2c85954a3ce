"""Deskewing: per-point times of every common driver, the constant-twist correction, and the place node's keyframes."""

from __future__ import annotations

import numpy as np
import pytest
from nav_msgs.msg import Odometry
from scipy.linalg import expm
from sensor_msgs.msg import PointField
from std_msgs.msg import Header

from ros_helpers import handle_scan, spin_until
from bevplace_ros.deskew import deskew, sweep_twist
from bevplace_ros.nodes.conversions import matrix_to_pose, ns_to_stamp
from bevplace_ros.pointcloud2 import FLOAT32, FLOAT64, UINT32, create_cloud, decode_scan, xyz_intensity
from bevplace_ros.se3 import _hat, se3_exp, se3_log

STAMP_NS = 1_700_000_000 * 10**9 + 250_000_000
TWIST = np.array([0.0, 0.0, 1.5, 10.0, 0.0, 0.0])  # 86 deg/s yaw, 10 m/s forward: a hard turn at speed


def _expm(twist: np.ndarray) -> np.ndarray:
    M = np.zeros((4, 4))
    M[:3, :3], M[:3, 3] = _hat(twist[:3]), twist[3:]
    return expm(M)


@pytest.mark.parametrize("scale", [0.0, 1e-7, 0.05, 1.0, 3.0])
def test_closed_form_se3_exp_and_log_match_the_matrix_exponential(scale):
    twists = np.random.default_rng(1).normal(size=(5, 6)) * scale
    for twist, T in zip(twists, se3_exp(twists)):
        assert np.allclose(T, _expm(twist), atol=1e-12)
        if np.linalg.norm(twist[:3]) < np.pi:
            assert np.allclose(se3_log(T), twist, atol=1e-9)


def _sweep(n: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points seen from a sensor moving with TWIST: (truth in the stamp's frame, as fired, offsets)."""
    rng = np.random.default_rng(0)
    truth = np.column_stack([rng.uniform(-30, 30, (n, 2)), rng.uniform(-1.5, 3, n), np.arange(n)]).astype(np.float32)
    offsets = np.sort(rng.uniform(0.0, 0.1, n))
    poses = se3_exp(offsets[:, None] * TWIST)  # T_stamp_fired
    fired = truth.copy()
    fired[:, :3] = np.einsum("nji,nj->ni", poses[:, :3, :3], truth[:, :3] - poses[:, :3, 3])
    return truth, fired, offsets


def test_deskew_with_the_sweeps_twist_restores_the_view_from_the_stamp():
    truth, fired, offsets = _sweep()
    twist = sweep_twist(se3_exp(np.array([-0.03 * TWIST]))[0], se3_exp(np.array([0.07 * TWIST]))[0], 0.1)
    assert np.allclose(twist, TWIST)
    error = np.linalg.norm(deskew(fired, offsets, twist)[:, :3] - truth[:, :3], axis=1)
    skew = np.linalg.norm(fired[:, :3] - truth[:, :3], axis=1)
    assert error.max() < 0.05 and np.median(skew) > 1.0, (error.max(), np.median(skew))  # time bins: <= 0.2 ms off
    assert np.array_equal(deskew(fired, offsets, twist)[:, 3], fired[:, 3])


def _cloud(points: np.ndarray, times: np.ndarray, name: str, datatype: int):
    dtype = {FLOAT32: np.float32, FLOAT64: np.float64, UINT32: np.uint32}[datatype]
    fields = [PointField(name=n, offset=4 * i, datatype=FLOAT32, count=1) for i, n in enumerate(("x", "y", "z", "intensity"))]
    fields.append(PointField(name=name, offset=16, datatype=datatype, count=1))
    data = np.zeros(len(points), np.dtype({"names": ["x", "y", "z", "intensity", name], "formats": ["<f4"] * 4 + [dtype],
                                           "offsets": [0, 4, 8, 12, 16], "itemsize": 16 + np.dtype(dtype).itemsize}))
    for i, n in enumerate(("x", "y", "z", "intensity")):
        data[n] = points[:, i]
    data[name] = times
    return create_cloud(Header(stamp=ns_to_stamp(STAMP_NS), frame_id="lidar"), fields, data)


@pytest.mark.parametrize("driver, name, datatype, encode", [
    ("velodyne", "time", FLOAT32, lambda s: s),
    ("ouster", "t", UINT32, lambda s: np.round(s * 1e9)),
    ("hesai", "timestamp", FLOAT64, lambda s: STAMP_NS * 1e-9 + s),
    ("livox", "offset_time", UINT32, lambda s: np.round(s * 1e9)),
])
def test_every_common_drivers_time_field_gives_seconds_after_the_stamp(driver, name, datatype, encode):
    _, fired, offsets = _sweep(200)
    scan = decode_scan(_cloud(fired, encode(offsets), name, datatype), STAMP_NS)
    assert np.allclose(scan.offsets, offsets, atol=1e-6), driver
    assert np.array_equal(scan.points, fired)


def test_a_time_field_in_an_unknown_unit_is_named_and_the_points_stay_usable():
    _, fired, offsets = _sweep(200)
    scan = decode_scan(_cloud(fired, offsets * 1e3, "time", FLOAT32), STAMP_NS)  # milliseconds
    assert scan.offsets is None and np.array_equal(scan.points, fired)
    assert "time field 'time'" in scan.time_problem and "unit" in scan.time_problem
    no_time = decode_scan(_cloud(fired, offsets, "range", FLOAT32), STAMP_NS)
    assert no_time.offsets is None and not no_time.time_problem


def test_the_place_node_publishes_keyframes_deskewed_with_the_odometry(ros_context):
    """A hard turn at speed: the keyframe's cloud (intensity = point id) must be the view from the pose at the stamp."""
    from bevplace_ros.msg import Keyframe
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode
    from bevplace_ros.nodes.qos import KEYFRAMES_QOS
    from rclpy.executors import SingleThreadedExecutor

    truth, fired, offsets = _sweep()
    node = PlaceRecognitionNode(context=ros_context)
    listener = __import__("rclpy").create_node("keyframe_listener", context=ros_context)
    received = []
    listener.create_subscription(Keyframe, "keyframes", received.append, KEYFRAMES_QOS)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(listener)
    try:
        for t in np.arange(-0.2, 0.25, 0.05):  # odometry (base = sensor) on both sides of the sweep
            msg = Odometry(header=Header(stamp=ns_to_stamp(STAMP_NS + round(t * 1e9)), frame_id="odom"))
            msg.pose.pose = matrix_to_pose(se3_exp(np.array([t * TWIST]))[0])
            node._on_odometry(msg)
        handle_scan(node, _cloud(fired, offsets, "time", FLOAT32))
        assert spin_until(executor, lambda: received, 30.0) and not node.skipped
        cloud = xyz_intensity(received[0].cloud)
        ids = cloud[:, 3].astype(int)
        assert len(ids) > 100
        error = np.linalg.norm(cloud[:, :3] - truth[ids, :3], axis=1)
        assert error.max() < 0.05 and np.median(np.linalg.norm(fired[ids, :3] - truth[ids, :3], axis=1)) > 1.0
    finally:
        executor.shutdown()
        listener.destroy_node()
        node.destroy_node()
