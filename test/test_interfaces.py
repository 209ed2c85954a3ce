"""The generated interfaces import and cross the real middleware (Fast DDS) intact."""

from __future__ import annotations

import array

import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy

from ros_helpers import spin_until


def _loop_closure():
    from bevplace_ros.msg import LoopClosure

    msg = LoopClosure()
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1700000000, 123456789
    msg.header.frame_id = "lidar"
    msg.query_id, msg.match_id = 812, 17
    msg.query_stamp.sec, msg.match_stamp.sec = 1700000000, 1699990000
    pose = msg.relative_pose.pose
    pose.position.x, pose.position.y, pose.position.z = 1.25, -3.5, 0.125
    pose.orientation.z, pose.orientation.w = np.sin(0.3), np.cos(0.3)
    msg.relative_pose.covariance = np.diag([0.01, 0.02, 0.03, 1e-4, 2e-4, 3e-4]).ravel()
    msg.fitness, msg.inlier_ratio, msg.num_correspondences = 0.93, 0.71, 412
    msg.descriptor_distance, msg.verified = 0.25, True
    msg.method, msg.reason, msg.latency_ms = "roitr_lite+gicp", "", 87.5
    return msg


def _cloud():
    from sensor_msgs.msg import PointCloud2, PointField

    points = np.random.default_rng(1).normal(size=(1000, 4)).astype(np.float32)
    msg = PointCloud2()
    msg.header.frame_id = "lidar"
    msg.height, msg.width = 1, len(points)
    msg.fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1) for i, n in enumerate("xyzi")]
    msg.fields[3].name = "intensity"
    msg.point_step, msg.row_step, msg.is_dense = 16, 16 * len(points), True
    msg.data = points.tobytes()
    return msg


def test_generated_interfaces_import():
    from bevplace_ros.msg import Keyframe, LoopCandidate, LoopClosure, PoseGraphEdge
    from bevplace_ros.srv import LoadMap, SaveMap

    assert PoseGraphEdge.LOOPCLOSE == 1 and PoseGraphEdge.REJECTED_LOOPCLOSE == 3
    assert len(PoseGraphEdge().covariance) == 36
    keyframe = Keyframe(descriptor=array.array("f", [0.5] * 8))
    assert keyframe.descriptor.tolist() == [0.5] * 8
    assert LoopCandidate().bev_inliers == 0 and not LoopClosure().verified
    assert SaveMap.Request().path == "" and LoadMap.Response().success is False


@pytest.mark.parametrize("kind", ["loop_closure", "point_cloud"])
def test_two_nodes_exchange_messages_intact(ros_context, kind):
    from bevplace_ros.msg import LoopClosure
    from sensor_msgs.msg import PointCloud2

    msg_type, sent = (LoopClosure, _loop_closure()) if kind == "loop_closure" else (PointCloud2, _cloud())
    talker = __import__("rclpy").create_node("talker", context=ros_context)
    listener = __import__("rclpy").create_node("listener", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(talker)
    executor.add_node(listener)
    received = []
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    listener.create_subscription(msg_type, "exchange", received.append, qos)
    publisher = talker.create_publisher(msg_type, "exchange", qos)
    assert spin_until(executor, lambda: publisher.get_subscription_count() > 0)
    publisher.publish(sent)
    assert spin_until(executor, lambda: len(received) > 0), "nothing crossed the middleware"
    executor.shutdown()
    # Messages compare field by field, arrays included.
    assert received[0] == sent
    if kind == "point_cloud":
        np.testing.assert_array_equal(np.frombuffer(bytes(received[0].data), np.float32), np.frombuffer(bytes(sent.data), np.float32))
