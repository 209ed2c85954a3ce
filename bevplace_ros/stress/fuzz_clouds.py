"""Malformed input: a seeded generator of bad PointCloud2 / odometry / loop messages, sent to the
three running nodes between good scans, in lock-step (each message is handled before the next).

The graph must stay up (no callback or worker dies), count and warn about each bad message, and
still turn every good scan into a keyframe that reaches the pose graph.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bevplace_ros.pointcloud2 import FLOAT32, FLOAT64, UINT8

# Each generator: (good points (N, 4) float32, stamp_ns, rng) -> cloud message. Odometry kinds are separate.
CLOUD_KINDS = ("missing_z", "duplicated_x", "wrong_datatype", "unknown_datatype", "offset_past_step", "data_short",
               "data_long", "big_endian", "nan_inf", "all_nan", "all_zero", "empty", "single_point", "stamp_backwards",
               "stamp_duplicate", "unknown_frame", "no_odometry", "row_step_short", "float64_xyz", "random_bytes")
OTHER_KINDS = ("odom_backwards", "odom_nan", "odom_jump", "candidate_unknown_ids", "closure_unknown_keys", "closure_bad_covariance")
HUGE_POINTS = 2_000_000


@dataclass(frozen=True)
class FuzzConfig:
    bad_messages: int = 1000
    good_every: int = 20  # a good scan after this many bad messages
    huge_clouds: int = 1  # 2-million-point clouds, timed
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bad_messages < 1 or self.good_every < 1 or self.huge_clouds < 0:
            raise ValueError(f"need bad_messages >= 1, good_every >= 1, huge_clouds >= 0; got {self}")


@dataclass
class FuzzReport:
    tried: int = 0
    per_kind: dict[str, int] = field(default_factory=dict)
    good_sent: int = 0
    good_processed: int = 0  # good scans that became keyframes and reached the pose graph
    nodes_alive: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # place node's skip counters
    skip_details: dict[str, str] = field(default_factory=dict)  # the latest detail of each skip reason
    huge_seconds: list[float] = field(default_factory=list)  # node time per 2M-point cloud
    huge_outcome: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _fields(names: str, datatype: int = FLOAT32, size: int = 4) -> list:
    from sensor_msgs.msg import PointField

    return [PointField(name=n, offset=size * i, datatype=datatype, count=1) for i, n in enumerate(names)]


def _cloud(points: np.ndarray, stamp_ns: int, frame: str = "lidar"):
    from std_msgs.msg import Header

    from bevplace_ros.nodes.conversions import ns_to_stamp, xyzi_cloud

    return xyzi_cloud(Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame), points)


def _raw(cloud, fields: list, data: bytes, point_step: int, width: int):
    cloud.fields, cloud.data, cloud.point_step, cloud.width, cloud.height, cloud.row_step = fields, data, point_step, width, 1, point_step * width
    return cloud


def bad_cloud(kind: str, good: np.ndarray, stamp_ns: int, last_good_ns: int, rng: np.random.Generator):
    """One cloud of `kind` (see CLOUD_KINDS), stamped just after the last good scan unless the kind is about stamps."""
    n = len(good)
    xyz = good[:, :3].astype(np.float32)
    if kind == "missing_z":
        return _raw(_cloud(good, stamp_ns), _fields("xy"), xyz[:, :2].tobytes(), 8, n)
    if kind == "duplicated_x":
        return _raw(_cloud(good, stamp_ns), _fields("xxyz"), np.c_[xyz[:, :1], xyz].tobytes(), 16, n)
    if kind == "wrong_datatype":  # uint8 x, y, z over float bytes: decodes to garbage small numbers
        return _raw(_cloud(good, stamp_ns), _fields("xyz", UINT8, 4), xyz.tobytes(), 12, n)
    if kind == "unknown_datatype":
        return _raw(_cloud(good, stamp_ns), _fields("xyz", 42, 4), xyz.tobytes(), 12, n)
    if kind == "offset_past_step":
        return _raw(_cloud(good, stamp_ns), _fields("xyz", FLOAT32, 8), xyz.tobytes(), 12, n)
    if kind in ("data_short", "data_long"):
        cloud = _cloud(good, stamp_ns)
        cut = int(rng.integers(1, cloud.point_step * 3))
        cloud.data = bytes(cloud.data)[:-cut] if kind == "data_short" else bytes(cloud.data) + bytes(cut)
        return cloud
    if kind == "row_step_short":
        cloud = _cloud(good, stamp_ns)
        cloud.row_step = cloud.point_step * n - 1
        return cloud
    if kind == "big_endian":  # a valid big-endian cloud: must decode to the same points
        cloud = _raw(_cloud(good, stamp_ns), _fields("xyz"), xyz.astype(">f4").tobytes(), 12, n)
        cloud.is_bigendian = True
        return cloud
    if kind == "float64_xyz":
        return _raw(_cloud(good, stamp_ns), _fields("xyz", FLOAT64, 8), xyz.astype("<f8").tobytes(), 24, n)
    if kind == "nan_inf":
        bad = good.copy()
        bad[rng.random(n) < 0.5, int(rng.integers(3))] = rng.choice([np.nan, np.inf, -np.inf])
        return _cloud(bad, stamp_ns)
    if kind == "all_nan":
        return _cloud(np.full_like(good, np.nan), stamp_ns)
    if kind == "all_zero":
        return _cloud(np.zeros_like(good), stamp_ns)
    if kind == "empty":
        return _cloud(good[:0], stamp_ns)
    if kind == "single_point":
        return _cloud(good[:1], stamp_ns)
    if kind == "stamp_backwards":
        return _cloud(good, last_good_ns - int(rng.integers(1, 10**9)))
    if kind == "stamp_duplicate":
        return _cloud(good, last_good_ns)
    if kind == "unknown_frame":
        return _cloud(good, stamp_ns, frame=f"frame_{int(rng.integers(1000))}")
    if kind == "no_odometry":  # far beyond the odometry received: an odometry gap
        return _cloud(good, stamp_ns + 10**11)
    if kind == "random_bytes":
        return _raw(_cloud(good, stamp_ns), _fields("xyz"), rng.bytes(12 * n), 12, n)
    raise ValueError(f"unknown fuzz kind {kind!r}; choose one of {CLOUD_KINDS}")


def run_fuzz(cfg: FuzzConfig, scans: Callable[[int], np.ndarray], overrides: tuple[str, ...]) -> FuzzReport:
    """Send cfg.bad_messages bad messages (round-robin over all kinds, seeded) and good scans to the nodes."""
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor

    from bevplace_ros.nodes.place_recognition_node import PlaceRecognitionNode
    from bevplace_ros.nodes.pose_graph_node import PoseGraphNode
    from bevplace_ros.nodes.registration_node import RegistrationNode

    args = ["--ros-args", *[a for o in (*overrides, "keyframe.min_distance:=0.0", "keyframe.max_interval:=0.01",
                                        "publish_tf:=false") for a in ("-p", o)]]
    context = Context()
    rclpy.init(args=args, context=context)
    nodes = [PlaceRecognitionNode(context=context), RegistrationNode(context=context), PoseGraphNode(context=context)]
    talker = rclpy.create_node("fuzzer", context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    for node in (*nodes, talker):
        executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    try:
        return _Fuzzer(cfg, nodes, talker, scans).run()
    finally:
        executor.shutdown(timeout_sec=5.0)
        for node in (*nodes, talker):
            node.destroy_node()
        context.try_shutdown()


class _Fuzzer:
    def __init__(self, cfg: FuzzConfig, nodes: list, talker, scans: Callable[[int], np.ndarray]) -> None:
        from nav_msgs.msg import Odometry
        from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import PointCloud2

        from bevplace_ros.msg import Keyframe, LoopCandidate, LoopClosure

        self.cfg, self.scans = cfg, scans
        self.place, self.registration, self.graph = nodes
        self.rng = np.random.default_rng(cfg.seed)
        reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        self.points = talker.create_publisher(PointCloud2, "points", qos_profile_sensor_data)
        self.odom = talker.create_publisher(Odometry, "odom", reliable)
        self.candidates = talker.create_publisher(LoopCandidate, "loop_candidates", reliable)
        self.closures = talker.create_publisher(LoopClosure, "loop_closures", reliable)
        self.keyframe_stamps: set[int] = set()
        talker.create_subscription(Keyframe, "keyframes", self._on_keyframe, reliable)
        self.report = FuzzReport()
        self.stamp_ns = 1_700_000_000 * 10**9
        self.odom_sent = 0
        self.odom_pose = np.eye(4)

    def _on_keyframe(self, msg) -> None:
        from bevplace_ros.nodes.conversions import stamp_to_ns

        self.keyframe_stamps.add(stamp_to_ns(msg.header.stamp))

    def run(self) -> FuzzReport:
        start = time.perf_counter()
        _wait(lambda: self.points.get_subscription_count() and self.odom.get_subscription_count()
              and self.candidates.get_subscription_count() and self.closures.get_subscription_count(), 30.0, "subscriptions")
        kinds = [*CLOUD_KINDS, *OTHER_KINDS]
        good_stamps = [self._good(0)]
        for i in range(self.cfg.bad_messages):
            kind = kinds[int(self.rng.integers(len(kinds)))] if i >= len(kinds) else kinds[i]
            self._bad(kind, good_stamps[-1])
            if (i + 1) % self.cfg.good_every == 0:
                good_stamps.append(self._good(len(good_stamps)))
        for _ in range(self.cfg.huge_clouds):
            self._huge()
        good_stamps.append(self._good(len(good_stamps)))
        _wait(lambda: self._settled(), 120.0, "the nodes to settle")
        r = self.report
        r.good_sent = len(good_stamps)
        r.good_processed = sum(s in self.keyframe_stamps for s in good_stamps) if self.graph.keyframes_handled >= self.place.keyframes_published else 0
        r.nodes_alive = sum(n.worker._thread.is_alive() for n in (self.place, self.registration)) + int(self.graph.keyframes_handled >= self.place.keyframes_published)
        r.skipped = dict(self.place.skipped)
        r.skip_details = dict(self.place.last_skip)
        r.wall_s = time.perf_counter() - start
        return r

    def _settled(self) -> bool:
        # The harness's own keyframe subscription must have caught up too, or the count races delivery.
        return (self.place.idle() and self.registration.idle() and self.graph.keyframes_handled >= self.place.keyframes_published
                and len(self.keyframe_stamps) >= self.place.keyframes_published)

    def _send_cloud(self, cloud, direct: bool = False) -> None:
        handled = self.place.clouds_handled
        (self.place._on_cloud if direct else self.points.publish)(cloud)
        _wait(lambda: self.place.clouds_handled > handled and self.place.idle(), 300.0, "place_recognition_node to handle a cloud")

    def _send_odometry(self, stamp_ns: int, pose: np.ndarray) -> None:
        from nav_msgs.msg import Odometry

        from bevplace_ros.nodes.conversions import matrix_to_pose, ns_to_stamp

        msg = Odometry()
        msg.header.stamp, msg.header.frame_id = ns_to_stamp(stamp_ns), "odom"
        msg.pose.pose = matrix_to_pose(pose) if np.all(np.isfinite(pose)) else _nan_pose()
        self.odom.publish(msg)
        self.odom_sent += 1
        _wait(lambda: self.place.odometry_received >= self.odom_sent, 30.0, "odometry delivery")

    def _good(self, index: int) -> int:
        """A good scan one second after the previous one, with odometry on both sides of its stamp."""
        self.stamp_ns += 10**9
        self.odom_pose = self.odom_pose @ _step(self.rng)
        self._send_odometry(self.stamp_ns - 10**7, self.odom_pose)
        self._send_odometry(self.stamp_ns + 10**8, self.odom_pose)
        self._good_points = self.scans(index)
        self._send_cloud(_cloud(self._good_points, self.stamp_ns))
        return self.stamp_ns

    def _bad(self, kind: str, last_good_ns: int) -> None:
        r = self.report
        r.tried += 1
        r.per_kind[kind] = r.per_kind.get(kind, 0) + 1
        self.stamp_ns += 10**6  # bad clouds sit between good ones, inside the odometry that covers them
        if kind in CLOUD_KINDS:
            return self._send_cloud(bad_cloud(kind, self._good_points, self.stamp_ns, last_good_ns, self.rng))
        if kind == "odom_backwards":
            return self._send_odometry(last_good_ns - 5 * 10**8, self.odom_pose)
        if kind == "odom_nan":
            return self._send_odometry(self.stamp_ns, np.full((4, 4), np.nan))
        if kind == "odom_jump":  # a 1 km teleport, which the odometry then continues from
            self.odom_pose = self.odom_pose @ _step(self.rng, 1000.0)
            return self._send_odometry(self.stamp_ns, self.odom_pose)
        return self._send_loop_message(kind)

    def _send_loop_message(self, kind: str) -> None:
        from bevplace_ros.msg import LoopCandidate, LoopClosure

        if kind == "candidate_unknown_ids":
            handled = self.registration.worker.handled
            self.candidates.publish(LoopCandidate(query_id=int(self.rng.integers(10**6, 2**63)), match_id=int(self.rng.integers(2**63)),
                                                  bev_inliers=100, bev_x=float("nan")))
            _wait(lambda: self.registration.worker.handled > handled, 30.0, "registration_node to handle a candidate")
            return
        msg = LoopClosure(verified=True, query_id=int(self.place.keyframes_published - 1), match_id=0)
        msg.relative_pose.pose.orientation.w = 1.0
        if kind == "closure_unknown_keys":
            msg.query_id = int(self.rng.integers(10**6, 2**63))
        else:
            msg.relative_pose.covariance = [float(v) for v in self.rng.normal(size=36)]
        handled = self.graph.loops_handled
        pending = sum(map(len, self.graph._pending.values()))
        self.closures.publish(msg)
        _wait(lambda: self.graph.loops_handled > handled or sum(map(len, self.graph._pending.values())) > pending, 30.0,
              "pose_graph_node to handle a loop")

    def _huge(self) -> None:
        """A 2-million-point cloud handed to the node's subscription callback, timed to the end of its handling."""
        self.stamp_ns += 3 * 10**8  # far enough from the last keyframe to be one, within the odometry gap allowed
        points = np.c_[self.rng.uniform(-60, 60, (HUGE_POINTS, 2)), self.rng.uniform(-2, 8, HUGE_POINTS), self.rng.random(HUGE_POINTS)].astype(np.float32)
        before = dict(self.place.skipped), self.place.keyframes_published
        start = time.perf_counter()
        self._send_cloud(_cloud(points, self.stamp_ns), direct=True)
        self.report.huge_seconds.append(time.perf_counter() - start)
        skipped = {k: v - before[0].get(k, 0) for k, v in self.place.skipped.items() if v != before[0].get(k, 0)}
        self.report.huge_outcome.append("keyframe" if self.place.keyframes_published > before[1] else f"skipped {skipped}")


def _step(rng: np.random.Generator, length: float = 1.0) -> np.ndarray:
    from bevplace_ros.se3 import xyyaw_to_matrix

    return xyyaw_to_matrix(length, 0.0, float(rng.normal(0.0, 0.05)))


def _nan_pose():
    from geometry_msgs.msg import Pose

    pose = Pose()
    pose.position.x = float("nan")
    return pose


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"fuzz: gave up waiting {timeout_s:.0f} s for {what}")
        time.sleep(0.001)
