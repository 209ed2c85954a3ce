"""Overload: the nodes shed work in the stated order, count it on /diagnostics and say so; keyframes are never lost.

Real nodes over the real middleware, fed faster than they can work (a burst, no rate): the place node
with an untrained seeded network, the registration node with its default registration.
"""

from __future__ import annotations

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from nav_msgs.msg import Odometry
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header

from ros_helpers import spin_until
from bevplace_ros.keyframe_selector import KeyframeSelector, KeyframeSelectorConfig
from bevplace_ros.msg import Keyframe, LoopCandidate, LoopClosure
from bevplace_ros.nodes.conversions import matrix_to_pose, ns_to_stamp, pose_with_covariance, stamp_to_ns, xyzi_cloud
from bevplace_ros.nodes.diagnostics import status_values
from bevplace_ros.nodes.qos import KEYFRAMES_QOS
from bevplace_ros.se3 import xyyaw_to_matrix

RELIABLE = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
SCAN_PERIOD_NS = 100_000_000  # 10 Hz


def _scene(rng: np.random.Generator) -> np.ndarray:
    """Walls and poles around the sensor: a scan every check passes."""
    walls = np.c_[rng.uniform(-25, 25, (6000, 1)), rng.choice([-8.0, 8.0], (6000, 1)), rng.uniform(-1, 3, (6000, 1))]
    poles = np.repeat(rng.uniform(-20, 20, (60, 2)), 50, axis=0)
    poles = np.c_[poles + rng.normal(scale=0.1, size=poles.shape), rng.uniform(-1.5, 3, (len(poles), 1))]
    points = np.r_[walls, poles]
    return np.c_[points, np.ones(len(points))].astype(np.float32)


def _poses(count: int) -> list[np.ndarray]:
    """0.35 m per scan with a slow swerve: a keyframe (1 m) every third scan or so, never two in a row."""
    return [xyyaw_to_matrix(0.35 * i, np.sin(0.1 * i), 0.05 * np.sin(0.3 * i)) for i in range(count)]


def _odometry(stamp_ns: int, pose: np.ndarray) -> Odometry:
    msg = Odometry()
    msg.header.stamp, msg.header.frame_id = ns_to_stamp(stamp_ns), "odom"
    msg.pose.pose = matrix_to_pose(pose)
    return msg


def _diagnostics(node, name: str) -> dict[str, str]:
    """Latest counters of `name` on /diagnostics, as a monitor reads them."""
    latest: dict[str, str] = {}
    node.create_subscription(DiagnosticArray, "/diagnostics",
                             lambda m: latest.update(*(status_values(s) for s in m.status if s.name == name)), 100)
    return latest


def _place_node_bench(ros_context, overrides: list[Parameter]) -> tuple:
    """A place node and a driver publishing reliable clouds and odometry to it, on one executor."""
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    node = PlaceRecognitionNode(context=ros_context, parameter_overrides=overrides)
    talker = rclpy.create_node("driver", context=ros_context)
    executor = MultiThreadedExecutor(context=ros_context)
    for n in (node, talker):
        executor.add_node(n)
    return node, talker, executor, talker.create_publisher(PointCloud2, "points", RELIABLE), talker.create_publisher(Odometry, "odom", RELIABLE)


def test_a_place_node_fed_faster_than_it_works_keeps_every_keyframe_and_counts_the_scans_it_dropped(ros_context):
    overrides = [Parameter("place.weights", value="random"), Parameter("points_qos", value="reliable"), Parameter("scan_queue", value=1),
                 Parameter("keyframe_queue", value=3), Parameter("shed.single_candidate_backlog", value=0),
                 Parameter("shed.no_rerank_backlog", value=1), Parameter("shed.undescribed_backlog", value=1)]
    node, talker, executor, clouds, odometry = _place_node_bench(ros_context, overrides)
    keyframe_stamps: list[int] = []
    undescribed: list[int] = []
    talker.create_subscription(Keyframe, "keyframes", lambda k: (keyframe_stamps.append(stamp_to_ns(k.header.stamp)),
                                                                 undescribed.extend([k.id] if not len(k.descriptor) else [])), KEYFRAMES_QOS)
    counters = _diagnostics(talker, node.get_fully_qualified_name())
    poses, rng = _poses(60), np.random.default_rng(0)
    stamps = [10**9 + i * SCAN_PERIOD_NS for i in range(len(poses))]
    selector = KeyframeSelector(KeyframeSelectorConfig())  # the node's defaults, applied offline to the same poses
    expected = [s for s, pose in zip(stamps, poses) if selector.accept(s * 1e-9, pose)]
    try:
        assert spin_until(executor, lambda: clouds.get_subscription_count() and odometry.get_subscription_count()
                          and talker.count_publishers("keyframes"))
        for stamp, pose in zip(stamps, poses):
            odometry.publish(_odometry(stamp, pose))
        assert spin_until(executor, lambda: node.odometry_received == len(poses))
        for burst in range(0, len(stamps), 6):  # bursts within the subscription's history: the node cannot keep up
            for stamp in stamps[burst:burst + 6]:
                clouds.publish(xyzi_cloud(Header(stamp=ns_to_stamp(stamp), frame_id="lidar"), _scene(rng)))
            assert spin_until(executor, lambda: node.clouds_received == min(burst + 6, len(stamps)))
        done = lambda: node.clouds_handled == len(stamps) and node.idle() and len(keyframe_stamps) == node.keyframes_published
        assert spin_until(executor, done, 120.0), (node.clouds_handled, node.keyframes_published)
        assert spin_until(executor, lambda: counters.get("handled") == str(len(stamps)), 30.0), counters
    finally:
        executor.shutdown()
        for n in (node, talker):
            n.destroy_node()
    assert keyframe_stamps == expected, "every keyframe the selector picks offline, in order, none lost"
    dropped = int(counters["dropped.scans_behind"])
    assert dropped > 0 and int(counters["processed"]) + dropped == len(stamps), counters
    assert counters["dropped.unexamined"] == "0" and int(counters.get("shed.description", 0)) == len(undescribed) > 0, counters
    assert not [k for k in counters if k.startswith("skipped.")], counters


def test_the_place_node_sheds_candidates_then_re_ranking_as_keyframes_pile_up(ros_context):
    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode

    node = PlaceRecognitionNode(context=ros_context, parameter_overrides=[Parameter("place.weights", value="random")])
    try:
        steps = [node._detection(backlog) for backlog in range(6)]  # the defaults: more than 2, more than 4 keyframes waiting
    finally:
        node.destroy_node()
    assert [(c.top_k, c.rerank_k) for c in steps] == [(3, 10)] * 3 + [(1, 10)] * 2 + [(1, 0)]
    assert node.diagnostics.shed_counts == {"candidates": 3, "rerank": 1}


def test_a_scan_that_arrives_before_its_odometry_waits_for_it(ros_context):
    """Odometry often comes a little after the scan: the scan gets the pose at its own stamp, not the last one known."""
    overrides = [Parameter("place.weights", value="random"), Parameter("points_qos", value="reliable"), Parameter("odom_wait", value=30.0)]
    node, talker, executor, clouds, odometry = _place_node_bench(ros_context, overrides)
    poses: list[np.ndarray] = []
    talker.create_subscription(Keyframe, "keyframes", lambda k: poses.append(k.odom_pose.pose), KEYFRAMES_QOS)
    try:
        assert spin_until(executor, lambda: clouds.get_subscription_count() and odometry.get_subscription_count()
                          and talker.count_publishers("keyframes"))
        odometry.publish(_odometry(1_800_000_000, xyyaw_to_matrix(0.0, 0.0, 0.0)))
        assert spin_until(executor, lambda: node.odometry_received == 1)
        clouds.publish(xyzi_cloud(Header(stamp=ns_to_stamp(2 * 10**9), frame_id="lidar"), _scene(np.random.default_rng(0))))
        assert spin_until(executor, lambda: node.clouds_received == 1)
        assert not node.idle(), "the scan waits for odometry at its stamp"
        odometry.publish(_odometry(2_200_000_000, xyyaw_to_matrix(4.0, 0.0, 0.0)))
        assert spin_until(executor, lambda: len(poses) == 1 and node.idle(), 60.0)
    finally:
        executor.shutdown()
        for n in (node, talker):
            n.destroy_node()
    assert abs(poses[0].position.x - 2.0) < 1e-9, "interpolated at the scan's stamp, halfway"


def _keyframe(key: int, cloud: np.ndarray) -> Keyframe:
    header = Header(stamp=ns_to_stamp(10**9 + key * SCAN_PERIOD_NS), frame_id="odom")
    return Keyframe(header=header, id=key, sensor_frame="lidar", odom_pose=pose_with_covariance(xyyaw_to_matrix(0.35 * key, 0, 0), np.eye(6) * 1e-4),
                    cloud=xyzi_cloud(Header(stamp=header.stamp, frame_id="lidar"), cloud), descriptor=[1.0])


class _RegistrationBench:
    """A registration node and a stand-in place node (publishes keyframes and candidates, records closures and /diagnostics)."""

    def __init__(self, ros_context, overrides: list[Parameter]) -> None:
        from bevplace_ros.nodes.registration_node import RegistrationNode

        self.node = RegistrationNode(context=ros_context, parameter_overrides=overrides)
        self.talker = rclpy.create_node("place_node", context=ros_context)
        self.executor = MultiThreadedExecutor(context=ros_context)
        for n in (self.node, self.talker):
            self.executor.add_node(n)
        self.keyframes = self.talker.create_publisher(Keyframe, "keyframes", KEYFRAMES_QOS)
        self.candidates = self.talker.create_publisher(LoopCandidate, "loop_candidates", RELIABLE)
        self.closures: list[LoopClosure] = []
        self.talker.create_subscription(LoopClosure, "loop_closures", self.closures.append, RELIABLE)
        self.counters = _diagnostics(self.talker, self.node.get_fully_qualified_name())

    def parts(self) -> tuple:
        return self.node, self.executor, self.keyframes, self.candidates, self.closures, self.counters

    def matched(self) -> bool:
        return bool(self.keyframes.get_subscription_count() and self.candidates.get_subscription_count()
                    and self.talker.count_publishers("loop_closures"))

    def close(self) -> None:
        self.executor.shutdown()
        for n in (self.node, self.talker):
            n.destroy_node()


def test_a_registration_node_fed_a_burst_sheds_low_rank_candidates_first_and_says_so(ros_context, capfd):
    bench = _RegistrationBench(ros_context, [Parameter("shed.redundant_backlog", value=10_000)])
    node, executor, keyframes, candidates, closures, counters = bench.parts()
    rng = np.random.default_rng(0)
    count, per_keyframe = 14, 3
    sent = [(q, q - 10 + r, r) for q in range(10, 10 + count) for r in range(per_keyframe)]  # (query, match, rank)
    try:
        assert spin_until(executor, bench.matched)
        for key in range(10 + count):
            keyframes.publish(_keyframe(key, _scene(rng)))
        assert spin_until(executor, lambda: node.keyframes_handled == 10 + count)
        for query, match, rank in sent:  # every candidate at once, as a place node far ahead would send them
            candidates.publish(LoopCandidate(query_id=query, match_id=match, rank=rank))
        assert spin_until(executor, lambda: node.worker.handled == len(sent) and node.idle(), 240.0), node.worker.handled
        assert spin_until(executor, lambda: len(closures) == node.closures_published and counters.get("candidates") == str(len(sent)), 30.0)
    finally:
        bench.close()
    answered = {(c.query_id, c.match_id) for c in closures}
    skipped = [(q, m, r) for q, m, r in sent if (q, m) not in answered]
    assert skipped and all(r >= 1 for _, _, r in skipped), "only candidates of rank >= 1 are shed at this backlog"
    assert all((q, m) in answered for q, m, r in sent if r == 0), "every keyframe's top candidate is verified"
    assert int(counters["shed.low_rank"]) == len(skipped) and counters["dropped.behind"] == "0", counters
    assert {(q, m) for q, m, r in sent[-per_keyframe:]} <= answered, "the newest keyframe's candidates, with nothing behind them, all verified"
    assert "registration is behind" in capfd.readouterr().err


def test_beyond_its_backlog_a_registration_node_skips_candidates_redundant_with_a_verified_loop(ros_context):
    """Step 2: the same place seen again and again (one scene), one rank-0 candidate per keyframe, all at once."""
    bench = _RegistrationBench(ros_context, [Parameter("shed.rank_backlog", value=0), Parameter("shed.redundant_backlog", value=0)])
    node, executor, keyframes, candidates, closures, counters = bench.parts()
    scene = _scene(np.random.default_rng(0))
    sent = [(q, q - 10) for q in range(10, 24)]
    try:
        assert spin_until(executor, bench.matched)
        for key in range(24):
            keyframes.publish(_keyframe(key, scene))
        assert spin_until(executor, lambda: node.keyframes_handled == 24)
        for query, match in sent:
            candidates.publish(LoopCandidate(query_id=query, match_id=match, rank=0))
        assert spin_until(executor, lambda: node.worker.handled == len(sent) and node.idle(), 240.0), node.worker.handled
        assert spin_until(executor, lambda: len(closures) == node.closures_published and counters.get("candidates") == str(len(sent)), 30.0)
    finally:
        bench.close()
    verified = [(c.query_id, c.match_id) for c in closures if c.verified]
    skipped = [pair for pair in sent if pair not in {(c.query_id, c.match_id) for c in closures}]
    assert verified[0] == sent[0] and skipped, (verified, skipped)
    assert all(any(abs(q - vq) <= 5 and abs(m - vm) <= 5 for vq, vm in verified) for q, m in skipped), (verified, skipped)
    assert int(counters["shed.redundant"]) == len(skipped) and "shed.low_rank" not in counters, counters
