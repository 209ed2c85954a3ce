"""Every skipped scan is visible: one throttled warning per reason, and counters on /diagnostics.

The place node runs in its own process, as `ros2 run` starts it; the test publishes like a driver
and reads what an operator sees: the node's log and its /diagnostics status.
"""

from __future__ import annotations

import re
import subprocess
import sys

from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from ros_helpers import spin_until
from bevplace_ros.nodes.conversions import ns_to_stamp, xyzi_cloud
from bevplace_ros.nodes.diagnostics import status_values
from bevplace_ros.nodes.runtime import stop_node_process
from bevplace_ros.pointcloud2 import create_cloud

GOOD = np.random.default_rng(0).uniform(-30, 30, (5000, 4)).astype(np.float32)


def _bad_scans() -> dict[str, PointCloud2]:
    """Four different bad scans, by the reason the node must name."""
    header = Header(stamp=ns_to_stamp(10**9), frame_id="lidar")
    missing_z = create_cloud(header, [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xy")], GOOD[:, :2])
    return {
        "malformed": missing_z,
        "frame": xyzi_cloud(Header(stamp=header.stamp, frame_id="elsewhere"), GOOD),
        "all near sensor": xyzi_cloud(header, np.zeros((20_000, 4), np.float32)),
        "too few points": xyzi_cloud(header, GOOD[:10]),
    }


def test_a_burst_of_four_different_bad_scans_leaves_four_warnings_and_four_counters(ros_context):
    node_process = subprocess.Popen(
        [sys.executable, "-m", "bevplace_ros.nodes.place_recognition_node", "--ros-args", "-p", "place.weights:=random", "-p", "sensor_frame:=lidar"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    talker = rclpy.create_node("burst_talker", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(talker)
    statuses: list[DiagnosticStatus] = []
    talker.create_subscription(DiagnosticArray, "/diagnostics",
                               lambda m: statuses.extend(s for s in m.status if s.name == "/place_recognition_node"), 100)
    clouds = talker.create_publisher(PointCloud2, "points", qos_profile_sensor_data)
    bad = _bad_scans()
    try:
        both_matched = lambda: clouds.get_subscription_count() and statuses and status_values(statuses[-1])["publishers"] == "1"
        assert spin_until(executor, both_matched, 120.0), "the node never came up"
        for cloud in bad.values():
            clouds.publish(cloud)
            spin_until(executor, lambda: False, 0.5)  # the input schedule of the bug report (0.5 s apart), not a wait for an event
        counts = lambda: status_values(statuses[-1])
        assert spin_until(executor, lambda: all(counts().get(f"skipped.{reason}") == "1" for reason in bad), 60.0), counts()
        for reason in bad:  # and the status turned WARN naming each of them
            assert any(s.level == DiagnosticStatus.WARN and f"skipped.{reason} +1" in s.message for s in statuses), [s.message for s in statuses]
        assert counts()["received"] == "4" and counts()["processed"] == counts()["keyframes"] == "0"
    finally:
        executor.shutdown()
        talker.destroy_node()
        log = stop_node_process(node_process)
    for reason in bad:
        assert log.count(f"scan skipped ({reason}, 1 so far)") == 1, log
    assert "DeprecationWarning" not in log


def test_no_deprecated_logger_warn_is_left():
    """rclpy's `warn` is deprecated (a DeprecationWarning in every log); `warning` replaces it."""
    package = Path(__file__).resolve().parents[1] / "bevplace_ros"
    calls = [f"{path.name}:{n}" for path in package.rglob("*.py") for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"\.warn\(", line)]
    assert not calls, calls


def test_registration_and_pose_graph_nodes_publish_their_counters_at_1_hz(ros_context):
    from bevplace_ros.nodes.pose_graph_node import PoseGraphNode
    from bevplace_ros.nodes.registration_node import RegistrationNode

    nodes = [RegistrationNode(context=ros_context), PoseGraphNode(context=ros_context)]
    listener = rclpy.create_node("diagnostics_listener", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    for node in [*nodes, listener]:
        executor.add_node(node)
    arrays: list[DiagnosticArray] = []
    listener.create_subscription(DiagnosticArray, "/diagnostics", arrays.append, 100)
    by_node = lambda name: [(a.header.stamp, s) for a in arrays for s in a.status if s.name == name]
    try:
        assert spin_until(executor, lambda: all(len(by_node(n.get_fully_qualified_name())) >= 2 for n in nodes), 60.0)
        for node, keys in zip(nodes, ({"keyframes", "candidates", "closures", "verified", "dropped.behind"}, {"keyframes_handled", "loops_handled"})):
            (first, status), (second, _) = by_node(node.get_fully_qualified_name())[:2]
            assert keys <= set(status_values(status)) and status.level == DiagnosticStatus.OK
            assert (second.sec + second.nanosec * 1e-9) - (first.sec + first.nanosec * 1e-9) >= 0.9  # a 1 s timer, late at worst
    finally:
        executor.shutdown()
        for node in [*nodes, listener]:
            node.destroy_node()
