"""pose_graph_node: keyframes + verified loops in, optimised path and map->odom correction out.

After `~/load_graph` the node continues in a new session (another run, another odometry frame):
map->odom is published only once that session is anchored to the loaded map, and the latched
`localized` topic says whether it is.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from geometry_msgs.msg import Point, PoseStamped, TransformStamped
from nav_msgs.msg import Path
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Bool, Header
from visualization_msgs.msg import Marker, MarkerArray

from bevplace_ros.msg import Keyframe, LoopClosure, PoseGraphEdge
from bevplace_ros.nodes.conversions import matrices_to_poses, matrix_to_pose, ns_to_stamp, pose_to_matrix, stamp_to_sec
from bevplace_ros.nodes.diagnostics import NodeDiagnostics
from bevplace_ros.nodes.map_services import serve_save_load
from bevplace_ros.nodes.parameters import ParamSpec, config_from_params, declare_parameters, specs_from_config
from bevplace_ros.nodes.qos import KEYFRAMES_QOS
from bevplace_ros.pose_graph import LOOP_KERNELS, PoseGraph, PoseGraphConfig, PoseGraphError

PREFIX = "graph."
GRAPH_DOCS = {
    "odom_sigma_trans_floor": ("Odometry translation sigma per keyframe edge [m].", 1e-4, 10.0),
    "odom_sigma_trans_per_m": ("Odometry translation sigma growth [m per m travelled].", 0.0, 1.0),
    "odom_sigma_rot_floor_deg": ("Odometry rotation sigma per edge [deg].", 1e-4, 45.0),
    "odom_sigma_rot_per_m_deg": ("Odometry rotation sigma growth [deg per m travelled].", 0.0, 10.0),
    "prior_sigma_trans": ("Anchor sigma of the first keyframe [m].", 1e-6, 10.0),
    "prior_sigma_rot_deg": ("Anchor sigma of the first keyframe [deg].", 1e-6, 45.0),
    "loop_sigma_trans": ("Added to every loop's translation sigma (registration covariances are lower bounds) [m].", 0.0, 100.0),
    "loop_sigma_rot_deg": ("Added to every loop's rotation sigma [deg].", 0.0, 90.0),
    "loop_kernel_param": ("Robust kernel width (cauchy/huber: k, dcs: Phi) on the whitened loop residual.", 1e-3, 1e6),
    "max_loop_translation": ("Sanity cap: loop-vs-estimate translation disagreement beyond the odometry uncertainty [m].", 0.01, 1e4),
    "max_loop_rotation_deg": ("Sanity cap: loop-vs-estimate rotation disagreement beyond the odometry uncertainty [deg].", 0.01, 360.0),
    "loop_gate_sigmas": ("Odometry-chain sigmas added to the sanity caps.", 0.0, 100.0),
    "relinearize_threshold": ("iSAM2 relinearisation threshold (tangent-space change).", 1e-6, 10.0),
    "relinearize_skip": ("iSAM2: check relinearisation every this many odometry updates (loops always relinearise).", 1, 100),
    "loop_extra_updates": ("Extra iSAM2 iterations after each loop.", 0, 100),
    "anchor_loops": ("A new session joins the map after this many agreeing loops to it, from different keyframes.", 1, 100),
    "anchor_agree_translation": ("Anchor hypotheses agree within this, plus the chain sigmas [m].", 0.01, 1e4),
    "anchor_agree_rotation_deg": ("Anchor hypotheses agree within this, plus the chain sigmas [deg].", 0.01, 180.0),
    "max_pending_loops": ("Anchor hypotheses held per unanchored session (oldest dropped).", 1, 100_000),
}

PARAMS = [
    *specs_from_config(PoseGraphConfig, PREFIX, GRAPH_DOCS, runtime=False),
    ParamSpec(PREFIX + "loop_kernel", PoseGraphConfig.loop_kernel, "Robust kernel on loop factors.", choices=LOOP_KERNELS, runtime=False),
    ParamSpec("map_frame", "map", "Frame of the optimised path.", runtime=False),
    ParamSpec("odom_frame", "odom", "Odometry frame; the correction is map_frame -> odom_frame.", runtime=False),
    ParamSpec("graph_file", "bevplace_graph.npz", "Default file for the save/load services.", runtime=True),
    ParamSpec("publish_tf", True, "Also publish the correction on /tf (needs tf2_msgs, present on ROS installs)."),
]


class PoseGraphNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("pose_graph_node", **kwargs)
        self.params = declare_parameters(self, PARAMS, self._on_change)
        self.graph = PoseGraph(config_from_params(PoseGraphConfig, self.params, PREFIX))
        self._pending: dict[int, list[LoopClosure]] = {}  # loops waiting for their query keyframe
        self.diagnostics = NodeDiagnostics(self, self.status)
        self.latency_ms = self.diagnostics.stage("pose_graph")  # graph update + publishing, per input
        self.keyframes_handled = 0
        self.loops_handled = 0
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.path_pub = self.create_publisher(Path, "optimized_path", latched)
        self.correction_pub = self.create_publisher(TransformStamped, "map_to_odom", latched)
        self.marker_pub = self.create_publisher(MarkerArray, "loop_markers", latched)
        self.localized_pub = self.create_publisher(Bool, "localized", latched)
        # what the graph did with each verified loop: taken (LOOPCLOSE) or refused by its gate (REJECTED_LOOPCLOSE)
        self.decision_pub = self.create_publisher(PoseGraphEdge, "loop_decisions", reliable)
        self.tf_pub, self._tf_message = self._tf_publisher() if self.params["publish_tf"] else (None, None)
        self.create_subscription(Keyframe, "keyframes", self._on_keyframe, KEYFRAMES_QOS)
        self.create_subscription(LoopClosure, "loop_closures", self._on_loop, reliable)
        serve_save_load(self, "graph", lambda: self.params["graph_file"], self._save_graph, self._load_graph, (PoseGraphError,))
        self.localized_pub.publish(Bool(data=self.graph.localized))

    def status(self) -> dict[str, Any]:
        """Diagnostics: live session, whether it is localised in the map, counts."""
        return {**self.graph.status(), "keyframes_handled": self.keyframes_handled, "loops_handled": self.loops_handled}

    def _tf_publisher(self):
        try:
            from tf2_msgs.msg import TFMessage
        except ImportError:
            self.get_logger().info("tf2_msgs not installed: map->odom goes to the map_to_odom topic only")
            return None, None
        return self.create_publisher(TFMessage, "/tf", 10), TFMessage

    def _on_change(self, values: dict[str, Any]) -> str | None:
        self.params.update(values)
        return None

    def _on_keyframe(self, msg: Keyframe) -> None:
        start = time.perf_counter()
        try:
            self.graph.add_keyframe(int(msg.id), stamp_to_sec(msg.header.stamp), pose_to_matrix(msg.odom_pose.pose))
        except (PoseGraphError, ValueError) as err:
            self.diagnostics.skip("bad keyframe", f"keyframe {msg.id}: {err}", what="keyframe")
            return
        finally:
            self.keyframes_handled += 1
        for loop in self._pending.pop(int(msg.id), []):
            self._add_loop(loop)
        self._publish(msg.header.stamp)
        self.latency_ms.append((time.perf_counter() - start) * 1e3)

    def _on_loop(self, msg: LoopClosure) -> None:
        if not msg.verified:
            self.loops_handled += 1
            return
        if int(msg.query_id) not in self.graph.keys and len(self._pending) < 1000:
            self._pending.setdefault(int(msg.query_id), []).append(msg)
            return
        start = time.perf_counter()
        self._add_loop(msg)
        self._publish(msg.header.stamp)
        self.latency_ms.append((time.perf_counter() - start) * 1e3)

    def _add_loop(self, msg: LoopClosure) -> None:
        try:
            covariance = np.asarray(msg.relative_pose.covariance, dtype=float).reshape(6, 6)
            decision = self.graph.add_loop(int(msg.match_id), int(msg.query_id), pose_to_matrix(msg.relative_pose.pose), covariance)
        except (PoseGraphError, ValueError) as err:
            self.diagnostics.skip("bad loop", f"loop {msg.match_id}<-{msg.query_id}: {err}", what="loop")
            return
        finally:
            self.loops_handled += 1  # once the graph holds the loop: lock-step replay reads the graph when the count is reached
        text = f"loop {msg.match_id}<-{msg.query_id}: {decision.reason}"
        if not decision.held:  # an anchor hypothesis is decided when its session joins the map (graph.loops() then)
            kind = PoseGraphEdge.LOOPCLOSE if decision.accepted else PoseGraphEdge.REJECTED_LOOPCLOSE
            self.decision_pub.publish(PoseGraphEdge(header=msg.header, key_from=msg.match_id, key_to=msg.query_id, type=kind,
                                                    pose=msg.relative_pose.pose, covariance=msg.relative_pose.covariance))
        if decision.accepted or decision.held:  # one call site per severity: rclpy refuses a second severity at one site
            self.get_logger().info(text)
        else:
            self.get_logger().warning(text)

    def _publish(self, stamp) -> None:
        if not self.graph.keys:
            return
        self.localized_pub.publish(Bool(data=self.graph.localized))
        poses = self.graph.optimized_poses()
        path = Path()
        path.header.stamp, path.header.frame_id = stamp, self.params["map_frame"]
        stamps = self.graph.stamps()
        path.poses = [PoseStamped(header=Header(stamp=ns_to_stamp(round(stamps[key] * 1e9)), frame_id=path.header.frame_id), pose=pose)
                      for key, pose in zip(poses, matrices_to_poses(np.array(list(poses.values()))))]
        self.path_pub.publish(path)
        T_map_odom = self.graph.map_to_odom()
        if T_map_odom is not None:  # None: the live session is not anchored yet, so there is no map->odom
            correction = self._correction(stamp, T_map_odom)
            self.correction_pub.publish(correction)
            if self.tf_pub is not None:
                self.tf_pub.publish(self._tf_message(transforms=[correction]))
        self.marker_pub.publish(self._loop_markers(stamp, poses))

    def _correction(self, stamp, T: np.ndarray) -> TransformStamped:
        msg = TransformStamped()
        msg.header.stamp, msg.header.frame_id, msg.child_frame_id = stamp, self.params["map_frame"], self.params["odom_frame"]
        pose = matrix_to_pose(T)
        msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = pose.position.x, pose.position.y, pose.position.z
        msg.transform.rotation = pose.orientation
        return msg

    def _loop_markers(self, stamp, poses: dict[int, np.ndarray]) -> MarkerArray:
        """Loops within a session in green (ns "loops"), between sessions in magenta (ns "inter_session")."""
        sessions = self.graph.sessions()
        markers = []
        for marker_id, (ns, rgb) in enumerate((("loops", (0.0, 1.0, 0.0)), ("inter_session", (1.0, 0.0, 1.0)))):
            marker = Marker(type=Marker.LINE_LIST, action=Marker.ADD, ns=ns, id=marker_id)
            marker.header.stamp, marker.header.frame_id = stamp, self.params["map_frame"]
            marker.scale.x = 0.3
            (marker.color.r, marker.color.g, marker.color.b), marker.color.a = rgb, 1.0
            marker.pose.orientation.w = 1.0
            markers.append(marker)
        for loop in self.graph.loops():
            marker = markers[int(sessions[loop.match_key] != sessions[loop.query_key])]
            for key in (loop.match_key, loop.query_key):
                x, y, z = poses[key][:3, 3]
                marker.points.append(Point(x=float(x), y=float(y), z=float(z)))
        return MarkerArray(markers=markers)

    def _save_graph(self, path: str) -> str:
        self.graph.save(path)
        return f"saved {len(self.graph.keys)} keyframes, {len(self.graph.loops())} loops"

    def _load_graph(self, path: str) -> str:
        graph = PoseGraph.load(path)
        session = graph.start_session()
        self.graph = graph
        self.localized_pub.publish(Bool(data=graph.localized))
        return (f"loaded {len(graph.keys)} keyframes in {len(set(graph.sessions().values()))} sessions, {len(graph.loops())} loops; "
                f"new keyframes are session {session}, not localised until it is anchored")


def main(args: list[str] | None = None) -> int:
    from bevplace_ros.nodes.runtime import run_node

    return run_node(PoseGraphNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
