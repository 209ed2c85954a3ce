"""The three nodes over the real middleware: end-to-end replay, bad input, save/restart/load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nav_msgs.msg import Odometry
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from conftest import PARAMS_FILE, replay_options
from ros_helpers import handle_scan, spin_until
from bevplace_ros.commands.replay import summarize_run
from bevplace_ros.nodes.bag_replay import replay
from bevplace_ros.nodes.conversions import matrix_to_pose, ns_to_stamp, xyzi_cloud
from bevplace_ros.nodes.runtime import stop_node_process
from bevplace_ros.pointcloud2 import create_cloud


def test_replay_finds_the_revisit_without_false_loops_and_lowers_ate(drive_replay):
    options, run = drive_replay
    summary, gt, _ = summarize_run(options, run)
    assert run.scans_published == summary["keyframes"] > 50
    assert summary["revisiting_keyframes"] >= 5
    assert summary["revisits_closed"] >= 0.5 * summary["revisiting_keyframes"], summary
    assert summary["graph_loops"] >= 3 and summary["graph_false_loops"] == 0, summary
    assert summary["ate_optimized_m"] < summary["ate_odometry_m"], summary
    assert (options.record / "metadata.yaml").is_file()


def test_recorded_bag_reads_back_with_rosbags(drive_replay):
    from rosbags.rosbag2 import Reader

    from bevplace_ros.nodes.interfaces import rosbags_typestore

    options, run = drive_replay
    store = rosbags_typestore()
    with Reader(options.record) as reader:
        keyframes = [store.deserialize_cdr(raw, c.msgtype) for c, _, raw in reader.messages() if c.topic == "/keyframes"]
    assert [k.id for k in keyframes] == sorted(run.keyframe_stamps)
    assert all(len(k.descriptor) > 0 and k.cloud.width > 100 for k in keyframes)


@pytest.mark.long
def test_save_restart_load_continues_the_same_map(drive, tmp_path):
    """Long (~60 s): the default suite's save/load/continue run is test_sessions'
    `test_replay_continues_a_saved_map_in_a_new_session_and_saves_both` (same drive, same split)."""
    first = replay_options(drive, tmp_path / "a", max_scans=40, save_map=tmp_path / "map", record=None)
    replay(first)
    assert {p.name for p in (tmp_path / "map").iterdir()} == {"place_map.npz", "keyframes.npz", "graph.npz"}
    second = replay_options(drive, tmp_path / "b", skip_scans=40, load_map=tmp_path / "map", record=None)
    run = replay(second)
    assert min(run.keyframe_stamps) == 40, "keyframe ids continue after the loaded map"
    verified = [(q, m) for q, m, _, ok, _ in run.closures if ok]
    assert any(m < 40 <= q for q, m in verified), "a revisit of a place saved before the restart is detected"


def _cloud(stamp_ns: int, points: np.ndarray, frame: str = "lidar") -> PointCloud2:
    return xyzi_cloud(Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame), points)


def _malformed(stamp_ns: int, good: np.ndarray) -> list[PointCloud2]:
    """One of each way a driver or a bridge can get a cloud wrong."""
    missing_z = create_cloud(Header(), [PointField(name=n, offset=4 * i, datatype=7, count=1) for i, n in enumerate("xy")], good[:, :2])
    truncated = _cloud(stamp_ns, good)
    truncated.data = bytes(truncated.data)[:-7]
    nan = _cloud(stamp_ns, np.full_like(good, np.nan))
    empty = _cloud(stamp_ns, good[:0])
    clouds = [missing_z, truncated, nan, empty, _cloud(stamp_ns, good[:1])]
    for cloud in clouds:
        cloud.header.stamp, cloud.header.frame_id = ns_to_stamp(stamp_ns), "lidar"
    return clouds


def test_place_node_survives_malformed_clouds_and_odometry_gaps(ros_context, drive):
    from bevplace_ros.datasets.rosbag2 import read_rosbag2
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    overrides = [Parameter("keyframe.min_distance", value=0.0), Parameter("keyframe.max_interval", value=0.01),
                 Parameter("odom_max_gap", value=0.2)]  # scans are 0.4 s apart: a missing odometry message is a gap
    node = PlaceRecognitionNode(context=ros_context, parameter_overrides=overrides)
    talker = __import__("rclpy").create_node("talker", context=ros_context)
    executor = MultiThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(talker)
    clouds = talker.create_publisher(PointCloud2, "points", qos_profile_sensor_data)
    odometry = talker.create_publisher(Odometry, "odom", QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
    assert spin_until(executor, lambda: clouds.get_subscription_count() and odometry.get_subscription_count())
    frames = [f for _, f in zip(range(6), read_rosbag2(drive))]
    sent_good = odom_sent = 0
    try:
        for i, frame in enumerate(frames):
            stamp_ns = round(frame.stamp * 1e9)
            odom = Odometry()
            odom.header.stamp, odom.header.frame_id = ns_to_stamp(stamp_ns), "odom"
            odom.pose.pose = matrix_to_pose(frame.odom_pose)
            if i != 3:  # an odometry gap: scan 3 has no odometry within odom_max_gap
                odometry.publish(odom)
                odom_sent += 1
                assert spin_until(executor, lambda: node.odometry_received >= odom_sent)
            for bad in _malformed(stamp_ns - 1000, frame.points):
                clouds.publish(bad)
                handled = node.clouds_handled
                assert spin_until(executor, lambda: node.clouds_handled > handled and node.idle())
            clouds.publish(_cloud(stamp_ns, frame.points))
            sent_good += i != 3
            handled = node.clouds_handled
            assert spin_until(executor, lambda: node.clouds_handled > handled and node.idle(), 120.0)
            for late in (_cloud(stamp_ns - 10**9, frame.points), _cloud(stamp_ns + 1, frame.points, frame="elsewhere")):
                clouds.publish(late)  # backwards in time; then a foreign frame id
                handled = node.clouds_handled
                assert spin_until(executor, lambda: node.clouds_handled > handled and node.idle())
        assert node.keyframes_published == sent_good == 5
        assert node.skipped["malformed"] >= 6 and node.skipped["too few points"] >= 12
        assert node.skipped["no odometry"] == 1 and node.skipped["stamp"] >= 5 and node.skipped["frame"] >= 5
    finally:
        executor.shutdown()
        node.destroy_node()


def test_three_separate_processes_talk_over_dds(drive, tmp_path):
    """Lock-step on the nodes' own outputs (each scan's keyframe, a closure per candidate): no rate, no quiet period."""
    env_args = ["--ros-args", "--params-file", str(PARAMS_FILE), "-p", "base_to_sensor:=[0.3, 0.0, 1.73, 0.0, 0.0, 0.0]",
                "-p", "keyframe.min_distance:=0.0", "-p", "keyframe.max_interval:=0.01"]  # every scan, even on late odometry
    names = ("place_recognition_node", "registration_node", "pose_graph_node")
    logs = [tmp_path / f"{name}.log" for name in names]
    processes = [subprocess.Popen([sys.executable, "-m", f"bevplace_ros.nodes.{name}", *env_args], stdout=log.open("w"),
                                  stderr=subprocess.STDOUT) for name, log in zip(names, logs)]
    try:
        run = replay(replay_options(drive, tmp_path, in_process=False))
        assert all(p.poll() is None for p in processes), "a node process died"
    finally:
        for p in processes:
            stop_node_process(p)  # its exit is not under test
    text = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert len(run.keyframe_stamps) == run.scans_published > 50, text
    assert [c for c in run.closures if c[3]], text
    assert set(run.optimized) == set(run.keyframe_stamps), text


def test_a_two_million_point_scan_is_thinned_and_becomes_a_keyframe(ros_context):
    """The scan goes through the node's own processing path, from its subscription callback on."""
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    node = PlaceRecognitionNode(context=ros_context)
    try:
        node.odometry.add(1.0, np.eye(4))
        points = (np.random.default_rng(0).normal(size=(2_000_000, 4)) * 20).astype(np.float32)
        handle_scan(node, _cloud(10**9, points))
        assert node.keyframes_published == 1 and not node.skipped
    finally:
        node.destroy_node()


def test_nodes_that_start_after_the_first_keyframe_still_get_it(ros_context):
    """ros2 launch starts all three at once: a late-matching subscriber must not lose keyframe 0."""
    from bevplace_ros.msg import Keyframe
    from bevplace_ros.nodes.conversions import pose_with_covariance
    from bevplace_ros.nodes.pose_graph_node import PoseGraphNode
    from bevplace_ros.nodes.qos import KEYFRAMES_QOS
    from bevplace_ros.nodes.registration_node import RegistrationNode

    talker = __import__("rclpy").create_node("early_place_node", context=ros_context)
    publisher = talker.create_publisher(Keyframe, "keyframes", KEYFRAMES_QOS)
    header = Header(stamp=ns_to_stamp(10**9), frame_id="odom")
    points = np.random.default_rng(0).uniform(-20, 20, (2000, 4)).astype(np.float32)
    publisher.publish(Keyframe(header=header, id=0, sensor_frame="lidar", odom_pose=pose_with_covariance(np.eye(4), np.eye(6) * 1e-4),
                               cloud=xyzi_cloud(Header(stamp=header.stamp, frame_id="lidar"), points), descriptor=[1.0]))
    late = [RegistrationNode(context=ros_context), PoseGraphNode(context=ros_context)]  # created after the publish
    executor = MultiThreadedExecutor(context=ros_context)
    for node in (talker, *late):
        executor.add_node(node)
    try:
        assert spin_until(executor, lambda: all(node.keyframes_handled == 1 for node in late), 60.0)
    finally:
        executor.shutdown()
        for node in (talker, *late):
            node.destroy_node()


def test_the_pose_graph_says_which_loops_it_took_and_which_its_gate_refused(ros_context):
    """loop_decisions: LOOPCLOSE for a loop the graph took, REJECTED_LOOPCLOSE for one 20 m off its estimate (what a
    replay with the nodes in their own processes counts as the graph's loops)."""
    from ros_helpers import pose_graph_with_client

    from bevplace_ros.msg import Keyframe, LoopClosure, PoseGraphEdge
    from bevplace_ros.nodes.conversions import pose_with_covariance
    from bevplace_ros.nodes.qos import KEYFRAMES_QOS
    from bevplace_ros.se3 import make_transform

    node, client, executor = pose_graph_with_client(ros_context, "decision_test")
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    decisions: list = []
    client.create_subscription(PoseGraphEdge, "loop_decisions", decisions.append, reliable)
    keyframes = client.create_publisher(Keyframe, "keyframes", KEYFRAMES_QOS)
    loops = client.create_publisher(LoopClosure, "loop_closures", reliable)
    cov = np.diag([0.01, 0.01, 0.01, 1e-4, 1e-4, 1e-4])
    try:
        assert spin_until(executor, lambda: keyframes.get_subscription_count() and loops.get_subscription_count()
                          and node.decision_pub.get_subscription_count(), 30.0)
        for k in range(30):  # a straight drive, 1 m per keyframe
            keyframes.publish(Keyframe(header=Header(stamp=ns_to_stamp((k + 1) * 10**9), frame_id="odom"), id=k,
                                       odom_pose=pose_with_covariance(make_transform(np.eye(3), [float(k), 0.0, 0.0]), np.zeros((6, 6)))))
        assert spin_until(executor, lambda: node.keyframes_handled == 30, 30.0)
        for y in (0.0, 20.0):  # T_0_29: right, then 20 m to the side of it
            loops.publish(LoopClosure(header=Header(stamp=ns_to_stamp(31 * 10**9), frame_id="lidar"), query_id=29, match_id=0,
                                      verified=True, relative_pose=pose_with_covariance(make_transform(np.eye(3), [29.0, y, 0.0]), cov)))
        assert spin_until(executor, lambda: len(decisions) == 2, 30.0)
        assert [(d.key_from, d.key_to, d.type) for d in decisions] == [
            (0, 29, PoseGraphEdge.LOOPCLOSE), (0, 29, PoseGraphEdge.REJECTED_LOOPCLOSE)]
    finally:
        executor.shutdown()
        node.destroy_node()
        client.destroy_node()
