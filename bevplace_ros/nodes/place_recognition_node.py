"""place_recognition_node: LiDAR scans + odometry in, keyframes and loop candidates out."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from nav_msgs.msg import Odometry
from rclpy.clock import Clock, ClockType
from rclpy.event_handler import QoSMessageLostInfo, QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header

from bevplace_ros.bev import BEV_PRESETS, BEVConfig, make_bev
from bevplace_ros.device import DEVICE_CHOICES
from bevplace_ros.keyframe_selector import KeyframeSelector, KeyframeSelectorConfig
from bevplace_ros.loop_detector import Candidate, LoopDetectorConfig
from bevplace_ros.models.checkpoint import BEV_PRESET_OF_MODEL, MODEL_KINDS
from bevplace_ros.msg import Keyframe, LoopCandidate
from bevplace_ros.nodes.conversions import (
    ns_to_stamp,
    pose_to_matrix,
    pose_with_covariance,
    stamp_to_ns,
    xyzi_cloud,
)
from bevplace_ros.nodes.diagnostics import NodeDiagnostics
from bevplace_ros.nodes.map_services import serve_save_load
from bevplace_ros.nodes.parameters import (
    ParamSpec,
    config_from_params,
    declare_parameters,
    specs_from_config,
    updated_config,
)
from bevplace_ros.nodes.qos import KEYFRAMES_QOS
from bevplace_ros.nodes.worker import TORCH_THREADS, QueueWorker, limit_torch_threads
from bevplace_ros.deskew import deskew, sweep_twist
from bevplace_ros.odometry_buffer import OdometryBuffer, OdometryLookupError
from bevplace_ros.place_map import PlaceMap, PlaceMapConfig, PlaceMapError
from bevplace_ros.pointcloud2 import TIME_FIELDS, PointCloud2Error, Scan, decode_scan
from bevplace_ros.registration.preprocess import voxel_representatives
from bevplace_ros.scan_checks import ScanCheckConfig, check_bev, check_points
from bevplace_ros.se3 import make_transform

# sensor_data: best effort, what LiDAR drivers publish; reliable: only matches reliable publishers,
# and lets the middleware resend lost fragments of large clouds. A history of 10 (1 s at 10 Hz, not
# sensor data's 5) keeps clouds that arrive while a busy machine starves the executor.
POINTS_QOS = {name: QoSProfile(depth=10, reliability=reliability, durability=qos_profile_sensor_data.durability)
              for name, reliability in (("sensor_data", ReliabilityPolicy.BEST_EFFORT), ("reliable", ReliabilityPolicy.RELIABLE))}
MIN_TWIST_SPAN_S = 0.05  # the odometry span the sweep's twist is measured over, at least
LARGE_CLOUD_HINT = "clouds larger than the middleware is set up for? Use config/fastdds_large_clouds.xml in every process (README: middleware)"

PARAMS = [
    *specs_from_config(BEVConfig, "bev.", {
        "range_m": ("Half-width of the square BEV crop around the sensor [m]; must match the weights.", 5.0, 200.0),
        "resolution": ("BEV cell size [m]; must match the weights.", 0.05, 5.0),
        "z_min": ("Lowest height kept, relative to the sensor [m] (set from the mounting height: drop the ground).", -20.0, 20.0),
        "z_max": ("Highest height kept, relative to the sensor [m].", -20.0, 50.0),
        "voxel_xy": ("Horizontal voxel of the downsampling before rasterising [m].", 0.05, 5.0),
        "voxel_z": ("Vertical voxel: a cell counts occupied voxels in its column [m].", 0.01, 5.0),
        "max_count": ("A BEV cell saturates at this many voxels.", 1, 1000),
    }, runtime=False),
    ParamSpec("bev.preset", "auto", "BEV recipe: 'auto' is the one place.model's weights were trained on ('bevplace_kitti' for "
              "'bevplace_v1', the bev.* values above for 'bevplace_equivariant'); empty: the bev.* values; or a named recipe "
              "('bevplace_kitti' turns raw scans into the published BEVPlace KITTI images).", choices=("auto", "", *BEV_PRESETS), runtime=False),
    *specs_from_config(PlaceMapConfig, "place.", {
        "rotations": ("Rotations of the equivariant network at inference (more: more rotation-invariant, slower).", 1, 64),
        "max_keyframes": ("Descriptor database bound; beyond it the oldest keyframes are forgotten.", 10, 100_000_000),
        "bev_in_memory": ("Keyframes whose BEV keypoints (float16, <= 130 kB each) are kept in RAM for re-ranking and the 3-DoF guess; "
                          "older ones spill or are dropped.", 1, 10_000_000),
    }, runtime=False),
    ParamSpec("place.model", PlaceMapConfig.model, "Place network: the BEVPlace authors' v1 (ICCV 2023) or the package's rotation-equivariant one.",
              choices=MODEL_KINDS, runtime=False),
    ParamSpec("place.weights", PlaceMapConfig.weights, "Weights of place.model (.pt; bevplace_v1 also the authors' .pth.tar); empty = its shipped weights.",
              runtime=False),
    ParamSpec("place.device", PlaceMapConfig.device, "Torch device for the network.", choices=DEVICE_CHOICES, runtime=False),
    ParamSpec("place.spill_dir", PlaceMapConfig.spill_dir, "Folder for spilled BEV keypoints; empty drops the oldest instead.", runtime=False),
    *specs_from_config(KeyframeSelectorConfig, "keyframe.", {
        "min_distance": ("New keyframe after this much travel [m]; 0 disables.", 0.0, 1000.0),
        "min_rotation_deg": ("New keyframe after this much rotation [deg]; 0 disables.", 0.0, 360.0),
        "max_interval": ("New keyframe after this long [s]; 0 disables.", 0.0, 1e6),
    }),
    *specs_from_config(LoopDetectorConfig, "retrieval.", {
        "top_k": ("Loop candidates published per keyframe.", 1, 100),
        "exclude_recent": ("The most recent keyframes are never candidates.", 0, 1_000_000),
        "exclude_seconds": ("Nor keyframes closer in time than this [s].", 0.0, 1e7),
        "max_descriptor_distance": ("Candidates need a descriptor distance below this (normalised, in [0, 2]).", 0.01, 2.0),
        "max_odom_distance": ("Skip candidates farther apart in odometry than this [m]; 0 disables (drift can be large).", 0.0, 1e6),
        "rerank_k": ("Places retrieved and re-ranked by BEV geometric agreement (inliers of the 3-DoF pose); 0: descriptor order, no rejection.",
                     0, 1000),
        "min_inliers": ("Re-ranking drops places whose BEV pose has fewer inliers than this.", 0, 100_000),
    }),
    ParamSpec("keyframe_cloud_voxel", 0.4, "Voxel of the cloud carried by the Keyframe message [m].", 0.05, 5.0, runtime=False),
    ParamSpec("max_range", 300.0, "Points farther than this from the sensor are dropped as garbage [m] (no LiDAR sees beyond).",
              1.0, 100_000.0),
    ParamSpec("min_points", ScanCheckConfig.min_points, "Scans with fewer finite points within max_range are skipped with a warning.", 1, 10_000_000),
    ParamSpec("min_radius", ScanCheckConfig.min_radius, "Scans whose farthest point is nearer than this (horizontally) are skipped as degenerate [m].",
              0.0, 1000.0),
    ParamSpec("min_bev_cells", ScanCheckConfig.min_bev_cells, "Scans whose BEV image has fewer occupied cells are skipped as degenerate "
              "(a 16-beam street scan has hundreds).", 0, 1_000_000),
    ParamSpec("max_points", 300_000, "Larger scans are thinned to this many points by an even stride (bounds the time per scan).",
              1000, 100_000_000),
    ParamSpec("odom_max_gap", 0.5, "Largest stamp gap to interpolate odometry across [s].", 0.001, 60.0, runtime=False),
    ParamSpec("base_to_sensor", [0.0] * 6, "LiDAR pose in the odometry child frame: x y z [m] roll pitch yaw [rad].", runtime=False),
    ParamSpec("pose_source", "odom", "Where keyframe poses come from: the odometry topic, or TF (odom_frame -> scan frame; needs tf2_ros).",
              choices=("odom", "tf"), runtime=False),
    ParamSpec("odom_frame", "odom", "Odometry frame for pose_source 'tf'.", runtime=False),
    ParamSpec("sensor_frame", "", "Expected frame of the scans; empty accepts the first one seen and then only that.", runtime=False),
    ParamSpec("map_file", "bevplace_place_map.npz", "Default file for the save/load services."),
    ParamSpec("points_qos", "sensor_data", "QoS of the points subscription: 'sensor_data' (best effort) or 'reliable' (needs a reliable publisher).",
              choices=tuple(POINTS_QOS), runtime=False),
    ParamSpec("scan_queue", 3, "Scans waiting for the first stage (stamp, pose, keyframe choice) while the node is busy; beyond it the "
              "node is behind and drops scans that would not become keyframes without decoding them (dropped.scans_behind). "
              "Keyframes still go on.", 1, 100, runtime=False),
    ParamSpec("scan_queue_limit", 100, "Hard bound on waiting scans (about 270 MB of 64-beam clouds); beyond it the oldest, not yet "
              "examined, is dropped (dropped.unexamined: the one loss that may hit a keyframe, reached only when the keyframe "
              "stage stays full). At least scan_queue.", 1, 10_000, runtime=False),
    ParamSpec("keyframe_queue", 100, "Keyframes waiting for the network; never dropped: when full, the first stage waits for room. "
              "Each holds its range-filtered scan and BEV image (about 2 MB for 120k points, 5 MB at max_points).", 1, 100_000, runtime=False),
    ParamSpec("shed.single_candidate_backlog", 2, "Shedding, step 1: with more keyframes than this waiting, a keyframe publishes only "
              "its top-ranked candidate (shed.candidates).", 0, 100_000, runtime=False),
    ParamSpec("shed.no_rerank_backlog", 4, "Shedding, step 2 (at least step 1's backlog): with more keyframes than this waiting, "
              "candidates keep the descriptor order, no BEV re-ranking (shed.rerank).", 0, 100_000, runtime=False),
    ParamSpec("shed.undescribed_backlog", 8, "Shedding, step 3 (at least step 2's backlog): with more keyframes than this waiting, a "
              "keyframe skips the network: published with its pose and cloud but no descriptor, it is never a loop query nor a "
              "candidate (shed.description). Keeps the keyframe queue, and the delay to a keyframe, bounded.", 0, 100_000, runtime=False),
    TORCH_THREADS,
    ParamSpec("odom_wait", 2.0, "A scan newer than the latest odometry waits up to this long after its arrival [s] for odometry at "
              "or after its stamp, then it is looked up as it can be, or skipped as 'no odometry' (on a loaded machine the odometry "
              "callback can run over half a second after the scan's).", 0.0, 60.0),
    ParamSpec("deskew", True, "Undo the motion inside each keyframe's sweep (constant twist from odometry over the sweep) so that its "
              f"BEV image and cloud are the view from the pose at its stamp; needs a per-point time field ({', '.join(TIME_FIELDS)}): "
              "scans without one are used as they are.", runtime=False),
    ParamSpec("scan_timeout", 5.0, "Warn when odometry arrives but no scan has for this long [s]; 0 disables.", 0.0, 3600.0),
]


def _bev_config(p: dict[str, Any]) -> BEVConfig:
    """bev.preset 'auto' follows place.model, so that switching the model never feeds it images of another recipe."""
    name = p["bev.preset"]
    if name == "auto":
        preset = BEV_PRESET_OF_MODEL[p["place.model"]]
        name = "" if preset == "default" else preset  # the equivariant model's recipe: the bev.* values, which a user may tune
    return BEVConfig.preset(name) if name else config_from_params(BEVConfig, p, "bev.")


@dataclass(frozen=True)
class _Arrival:
    msg: PointCloud2
    time: float  # monotonic; a scan waits for its odometry from here (odom_wait)


@dataclass(frozen=True)
class _KeyframeJob:
    """A scan chosen as keyframe, checked, with the BEV image the check made (the network's input)."""

    header: Header
    stamp_ns: int
    points: np.ndarray
    bev: np.ndarray
    bev_ms: float  # time it took to make (counted in the keyframe's place_recognition latency)
    T_odom_sensor: np.ndarray
    covariance: np.ndarray  # (6, 6) of the odometry, and its frame, when the scan was chosen
    odom_frame: str
    travelled: float  # the selector's odometry path length at this keyframe


class PlaceRecognitionNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("place_recognition_node", **kwargs)
        self.params = declare_parameters(self, PARAMS, self._on_change)
        p = self.params
        limit_torch_threads(p["torch_threads"])
        if len(p["base_to_sensor"]) != 6:
            raise ValueError(f"base_to_sensor must have 6 numbers (x y z roll pitch yaw), got {len(p['base_to_sensor'])}")
        x, y, z, *rpy = p["base_to_sensor"]
        self.T_base_sensor = make_transform(Rotation.from_euler("xyz", rpy).as_matrix(), np.array([x, y, z]))
        map_cfg = replace(config_from_params(PlaceMapConfig, p, "place."), model=p["place.model"], weights=p["place.weights"], device=p["place.device"], spill_dir=p["place.spill_dir"])
        self.bev_cfg = _bev_config(p)
        self.map = PlaceMap(map_cfg, self.bev_cfg, config_from_params(LoopDetectorConfig, p, "retrieval."))
        self.selector = KeyframeSelector(config_from_params(KeyframeSelectorConfig, p, "keyframe."))
        self.scan_checks = config_from_params(ScanCheckConfig, p, "")
        if not (p["scan_queue"] <= p["scan_queue_limit"]
                and p["shed.single_candidate_backlog"] <= p["shed.no_rerank_backlog"] <= p["shed.undescribed_backlog"]):
            raise ValueError("need scan_queue <= scan_queue_limit and shed.single_candidate_backlog <= shed.no_rerank_backlog <= "
                             "shed.undescribed_backlog (the order of shedding)")
        self.odometry = OdometryBuffer(max_gap=p["odom_max_gap"])
        self._odom_cond = threading.Condition()  # guards the odometry; notified when some arrives (a scan may wait for it)
        self._latest_odom_s = -math.inf
        self._odom_frame = "odom"
        self._odom_covariance = np.zeros(36)
        self._sensor_frame = p["sensor_frame"]
        self._last_stamp_ns = -1
        self.odometry_received = 0
        self.clouds_received = 0
        self.clouds_handled = 0  # done with: skipped, dropped as behind, not a keyframe, or published as one
        self._handled_lock = threading.Lock()  # both stages count handled scans
        self.clouds_processed = 0  # handled and not skipped: keyframe or not
        self.scans_behind = 0  # non-keyframe scans dropped undecoded while the first stage was behind
        self.clouds_lost = 0  # reported lost by the middleware (message_lost events)
        self.keyframes_published = 0
        self.candidates_published = 0
        self._last_cloud_time, self._last_odom_time = time.monotonic(), -math.inf
        self._qos_mismatch = False  # a publisher on points with QoS incompatible with points_qos was seen
        self.diagnostics = NodeDiagnostics(self, self._counters)
        self.skipped, self.last_skip = self.diagnostics.skipped, self.diagnostics.last_skip
        self.decode_ms = self.diagnostics.stage("decode")  # conversion, range filter and scan checks, per decoded scan
        self.latency_ms = self.diagnostics.stage("place_recognition")  # BEV + descriptor + retrieval + BEV pose, per keyframe
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.keyframe_pub = self.create_publisher(Keyframe, "keyframes", KEYFRAMES_QOS)
        self.candidate_pub = self.create_publisher(LoopCandidate, "loop_candidates", reliable)
        # two stages: every scan in arrival order (cheap), then keyframes only (the network), whose queue never drops
        self.keyframe_worker = QueueWorker(self._describe, self._worker_error, "place_recognition", p["keyframe_queue"], block=True)
        self.worker = QueueWorker(self._triage, self._worker_error, "scan_triage", p["scan_queue_limit"])
        events = SubscriptionEventCallbacks(message_lost=self._on_clouds_lost, incompatible_qos=self._on_incompatible_qos)
        self.points_sub = self.create_subscription(PointCloud2, "points", self._on_cloud, POINTS_QOS[p["points_qos"]], event_callbacks=events)
        self._tf_buffer = self._tf_listener() if p["pose_source"] == "tf" else None
        self.create_subscription(Odometry, "odom", self._on_odometry, QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
        self.create_timer(1.0, self._check_inputs, clock=Clock(clock_type=ClockType.STEADY_TIME))
        serve_save_load(self, "map", lambda: self.params["map_file"], self._save_map, self._load_map, (PlaceMapError,))

    def _tf_listener(self):
        try:
            from tf2_ros import Buffer, TransformListener
        except ImportError:
            raise ValueError("pose_source 'tf' needs tf2_ros, which comes with a ROS 2 install; use pose_source 'odom'") from None
        buffer = Buffer()
        self._tf_listener_handle = TransformListener(buffer, self)
        return buffer

    def _sensor_pose(self, msg: PointCloud2, stamp_ns: int, arrived: float) -> np.ndarray:
        """T_odom_sensor at the scan's stamp, from the odometry topic (with the mount) or from TF.

        Odometry often arrives just after the scan: the scan waits for odometry at or after its stamp until `odom_wait`
        after it arrived (the first stage holds the scans behind it meanwhile, keeping their order), then takes what is there.
        """
        if self._tf_buffer is None:
            deadline = arrived + self.params["odom_wait"]
            with self._odom_cond:
                while self._latest_odom_s < stamp_ns * 1e-9 and (left := deadline - time.monotonic()) > 0:
                    self._odom_cond.wait(left)
        return self._pose_at(msg, stamp_ns)

    def _pose_at(self, msg: PointCloud2, stamp_ns: int) -> np.ndarray:
        """T_odom_sensor at `stamp_ns` from what has arrived, without waiting."""
        if self._tf_buffer is None:
            with self._odom_cond:
                return self.odometry.lookup(stamp_ns * 1e-9) @ self.T_base_sensor
        from rclpy.time import Time
        from tf2_ros import TransformException

        try:
            tf = self._tf_buffer.lookup_transform(self.params["odom_frame"], msg.header.frame_id, Time(nanoseconds=stamp_ns))
        except TransformException as err:
            raise OdometryLookupError(f"TF {self.params['odom_frame']} -> {msg.header.frame_id}: {err}") from None
        t, q = tf.transform.translation, tf.transform.rotation
        self._odom_frame = self.params["odom_frame"]
        return make_transform(Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix(), np.array([t.x, t.y, t.z]))

    def idle(self) -> bool:
        return self.worker.idle() and self.keyframe_worker.idle()

    def destroy_node(self) -> None:
        if hasattr(self, "worker"):  # absent when the constructor failed (bad parameter, missing weights)
            self.keyframe_worker.stop()  # first: it frees a first stage waiting for room
            self.worker.stop()
        super().destroy_node()

    def _on_change(self, values: dict[str, Any]) -> str | None:
        try:
            selector = updated_config(self.selector.cfg, values, "keyframe.")
            retrieval = updated_config(self.map.detector.cfg, values, "retrieval.")
            scan_checks = updated_config(self.scan_checks, values, "")
        except ValueError as err:
            return str(err)
        self.selector.cfg, self.map.detector.cfg, self.scan_checks = selector, retrieval, scan_checks
        self.params.update(values)
        return None

    def _counters(self) -> dict[str, int]:
        return {"publishers": self.points_sub.get_publisher_count(), "received": self.clouds_received, "handled": self.clouds_handled, "processed": self.clouds_processed,
                "keyframes": self.keyframes_published, "candidates": self.candidates_published, "odometry": self.odometry_received,
                "dropped.scans_behind": self.scans_behind, "dropped.unexamined": self.worker.dropped, "lost": self.clouds_lost}

    def _check_inputs(self) -> None:
        """Odometry arriving while scans do not is the symptom of a cloud the transport cannot carry."""
        timeout, now = self.params["scan_timeout"], time.monotonic()
        silent = now - self._last_cloud_time
        if not (timeout > 0 and silent >= timeout and now - self._last_odom_time < timeout):
            return self.diagnostics.condition("no scans", None)
        publishers = self.points_sub.get_publisher_count()
        if self._qos_mismatch:
            cause = f"a publisher's QoS is incompatible with points_qos={self.params['points_qos']!r}"
        elif publishers == 0:
            cause = "no publisher on it: check the topic name and remapping"
        elif self.clouds_lost:
            cause = f"{publishers} publisher(s), {self.clouds_lost} scans lost by the middleware: {LARGE_CLOUD_HINT}"
        else:
            cause = f"{publishers} publisher(s) matched, yet nothing arrives: {LARGE_CLOUD_HINT}"
        text = f"odometry is arriving but no scan on {self.points_sub.topic_name} for {silent:.0f} s; {cause}"
        self.diagnostics.condition("no scans", text)
        self.diagnostics.warning("no scans", text)
        return None

    def _on_clouds_lost(self, info: QoSMessageLostInfo) -> None:
        self.clouds_lost = info.total_count
        self.diagnostics.warning("lost", f"the middleware lost {info.total_count_change} scans on {self.points_sub.topic_name} "
                                         f"({info.total_count} so far): {LARGE_CLOUD_HINT}")

    def _on_incompatible_qos(self, info: QoSRequestedIncompatibleQoSInfo) -> None:
        self._qos_mismatch = True
        self.diagnostics.warning("incompatible qos", f"a publisher on {self.points_sub.topic_name} has QoS incompatible with points_qos="
                                                     f"{self.params['points_qos']!r} (policy id {info.last_policy_kind}): no scan from it "
                                                     "arrives; a best-effort publisher needs points_qos 'sensor_data'")

    def _on_odometry(self, msg: Odometry) -> None:
        try:
            pose, stamp = pose_to_matrix(msg.pose.pose), stamp_to_ns(msg.header.stamp) * 1e-9
            with self._odom_cond:
                self.odometry.add(stamp, pose)
                self._latest_odom_s = stamp
                self._odom_frame = msg.header.frame_id or self._odom_frame
                self._odom_covariance = np.asarray(msg.pose.covariance, dtype=float)
                self._odom_cond.notify_all()
        except ValueError as err:
            self.diagnostics.skip("odometry", str(err), what="odometry message")
        finally:
            self.odometry_received += 1
            self._last_odom_time = time.monotonic()

    def _on_cloud(self, msg: PointCloud2) -> None:
        self.clouds_received += 1
        self._last_cloud_time = time.monotonic()
        before = self.worker.dropped
        self.worker.submit(_Arrival(msg, self._last_cloud_time))
        if self.worker.dropped > before:
            self.diagnostics.warning("dropped.unexamined", f"the keyframe stage stays full: dropped {self.worker.dropped} scans unexamined "
                                                          f"so far (oldest first, beyond scan_queue_limit={self.worker.max_size})")

    def _worker_error(self, err: Exception) -> None:
        self.diagnostics.skip("error", f"{type(err).__name__}: {err}")

    def _count_handled(self) -> None:
        with self._handled_lock:
            self.clouds_handled += 1

    def _triage(self, arrival: _Arrival) -> None:
        """First stage, every scan in arrival order: a keyframe goes on to the second stage, anything else is done here."""
        job = None
        try:
            job = self._select(arrival)
        finally:
            if job is None:
                self._count_handled()
        if job is not None:
            self.keyframe_worker.submit(job)  # waits while keyframe_queue is full: keyframes are never dropped

    def _select(self, arrival: _Arrival) -> _KeyframeJob | None:
        """Checks, pose and the keyframe choice. Behind (more than scan_queue scans waiting), a scan that is not due as a
        keyframe is dropped before it is decoded; only a keyframe gets a BEV image, checked and handed to the network."""
        msg = arrival.msg
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if stamp_ns <= self._last_stamp_ns:
            return self.diagnostics.skip("stamp", f"stamp {stamp_ns * 1e-9:.6f} s is not after the previous scan's {self._last_stamp_ns * 1e-9:.6f} s")
        if self._sensor_frame and msg.header.frame_id != self._sensor_frame:
            return self.diagnostics.skip("frame", f"frame_id {msg.header.frame_id!r}, expected {self._sensor_frame!r}")
        behind = self.worker.pending() > self.params["scan_queue"]
        scan = None
        if not behind and (scan := self._checked_scan(msg, stamp_ns)) is None:
            return None
        try:
            T_odom_sensor = self._sensor_pose(msg, stamp_ns, arrival.time)
        except OdometryLookupError as err:
            return self.diagnostics.skip("no odometry", str(err))
        due = self.selector.due(stamp_ns * 1e-9, T_odom_sensor)
        if not due and behind:
            self._last_stamp_ns = stamp_ns
            self.scans_behind += 1
            return self.diagnostics.warning("dropped.scans_behind", f"place recognition is behind: dropped {self.scans_behind} scans that "
                                            f"would not become keyframes so far (more than scan_queue={self.params['scan_queue']} waiting)")
        if scan is None and (scan := self._checked_scan(msg, stamp_ns)) is None:
            return None
        bev, points, start = None, scan.points, time.perf_counter()
        if due:
            points = self._deskewed(scan, stamp_ns, T_odom_sensor, msg)
            bev = make_bev(points, self.bev_cfg)
            if rejection := check_bev(bev, self.scan_checks, self.bev_cfg):
                return self.diagnostics.skip(rejection.reason, rejection.detail)
        self._sensor_frame = self._sensor_frame or msg.header.frame_id
        self._last_stamp_ns = stamp_ns
        self.clouds_processed += 1
        if not due:
            return None
        self.selector.accept(stamp_ns * 1e-9, T_odom_sensor)
        with self._odom_cond:
            odom_frame, covariance = self._odom_frame, self._odom_covariance.reshape(6, 6)
        return _KeyframeJob(msg.header, stamp_ns, points, bev, (time.perf_counter() - start) * 1e3, T_odom_sensor, covariance, odom_frame,
                            self.selector.travelled)

    def _checked_scan(self, msg: PointCloud2, stamp_ns: int) -> Scan | None:
        """The scan's finite points within max_range (thinned to max_points) and their times, or None when it is skipped as bad."""
        start = time.perf_counter()
        try:
            scan = decode_scan(msg, stamp_ns)
        except PointCloud2Error as err:
            return self.diagnostics.skip("malformed", str(err))
        xyz = scan.points[:, :3]
        keep = np.flatnonzero(np.einsum("ij,ij->i", xyz, xyz) <= self.params["max_range"] ** 2)
        if len(keep) > self.params["max_points"]:
            keep = keep[np.linspace(0, len(keep) - 1, self.params["max_points"]).astype(np.int64)]
        if scan.time_problem and self.params["deskew"]:
            self.diagnostics.warning("deskew", f"scans are not deskewed: {scan.time_problem}")
        scan = Scan(scan.points[keep], None if scan.offsets is None else scan.offsets[keep])
        if rejection := check_points(scan.points, self.scan_checks):
            return self.diagnostics.skip(rejection.reason, rejection.detail)
        self.decode_ms.append((time.perf_counter() - start) * 1e3)
        return scan

    def _deskewed(self, scan: Scan, stamp_ns: int, T_odom_sensor: np.ndarray, msg: PointCloud2) -> np.ndarray:
        """The keyframe's points as seen from its stamp's pose: twist from the odometry over the sweep (forward where the
        odometry already covers it, else the same span before the stamp)."""
        if not self.params["deskew"] or scan.offsets is None or np.ptp(scan.offsets) == 0:
            return scan.points
        span = max(float(np.ptp(scan.offsets)), MIN_TWIST_SPAN_S)
        with self._odom_cond:
            latest = self._latest_odom_s if self._tf_buffer is None else stamp_ns * 1e-9
        end = min(stamp_ns * 1e-9 + float(scan.offsets.max()), latest)
        try:
            T_end = T_odom_sensor if end == stamp_ns * 1e-9 else self._pose_at(msg, round(end * 1e9))
            twist = sweep_twist(self._pose_at(msg, round((end - span) * 1e9)), T_end, span)
        except OdometryLookupError as err:
            self.diagnostics.warning("deskew", f"keyframe not deskewed: no odometry over its sweep ({err})")
            return scan.points
        return deskew(scan.points, scan.offsets, twist)

    def _describe(self, job: _KeyframeJob) -> None:
        """Second stage, keyframes only: network, retrieval, publication; sheds candidates, re-ranking, then the network
        itself, as keyframes pile up."""
        try:
            backlog = self.keyframe_worker.pending()
            if backlog > self.params["shed.undescribed_backlog"]:
                self.diagnostics.shed("description", f"place recognition is behind ({backlog} keyframes waiting): a keyframe published "
                                                     "without descriptor, never a loop query nor candidate")
                return self._publish(job, self.map.add_undescribed(job.T_odom_sensor), np.zeros(0, np.float32), [])
            start = time.perf_counter()
            detected = self.map.add_keyframe(job.stamp_ns * 1e-9, job.points, job.T_odom_sensor, job.bev, self._detection(backlog))
            self.latency_ms.append(job.bev_ms + (time.perf_counter() - start) * 1e3)
            return self._publish(job, detected.id, detected.features.descriptor, detected.candidates)
        finally:
            self._count_handled()

    def _detection(self, backlog: int) -> LoopDetectorConfig:
        """The retrieval settings for a keyframe with `backlog` keyframes waiting behind it: shed in the stated order."""
        cfg, p = self.map.detector.cfg, self.params
        if backlog > p["shed.single_candidate_backlog"] and cfg.top_k > 1:
            cfg = replace(cfg, top_k=1)
            self.diagnostics.shed("candidates", f"place recognition is behind ({backlog} keyframes waiting): publishing only the top-ranked "
                                                "loop candidate of a keyframe")
        if backlog > p["shed.no_rerank_backlog"] and cfg.rerank_k:
            cfg = replace(cfg, rerank_k=0)
            self.diagnostics.shed("rerank", f"place recognition is behind ({backlog} keyframes waiting): no BEV re-ranking of a keyframe's places")
        return cfg

    def _publish(self, job: _KeyframeJob, key: int, descriptor: np.ndarray, candidates: list[Candidate]) -> None:
        cloud_header, points = job.header, job.points
        keep = voxel_representatives(points[:, :3].astype(np.float64), self.params["keyframe_cloud_voxel"])
        keyframe = Keyframe(
            header=Header(stamp=cloud_header.stamp, frame_id=job.odom_frame), id=key,
            sensor_frame=cloud_header.frame_id, odom_pose=pose_with_covariance(job.T_odom_sensor, job.covariance),
            travelled_distance=job.travelled, cloud=xyzi_cloud(cloud_header, points[keep]),
            descriptor=descriptor.astype(np.float32), descriptor_model=self.map.model_id,
        )
        self.keyframe_pub.publish(keyframe)
        self.keyframes_published += 1
        for candidate in candidates:
            self.candidate_pub.publish(self._candidate_msg(cloud_header, candidate))
            self.candidates_published += 1

    def _candidate_msg(self, header: Header, c: Candidate) -> LoopCandidate:
        msg = LoopCandidate(header=header, query_id=c.query_id, query_stamp=ns_to_stamp(round(c.query_stamp * 1e9)),
                            match_id=c.match_id, match_stamp=ns_to_stamp(round(c.match_stamp * 1e9)), rank=c.rank,
                            descriptor_distance=c.descriptor_distance, odom_distance=c.odom_distance)
        if c.bev is not None:
            msg.bev_x, msg.bev_y, msg.bev_yaw, msg.bev_inliers = float(c.bev.x), float(c.bev.y), float(c.bev.yaw), int(c.bev.inliers)
        return msg

    def _save_map(self, path: str) -> str:
        self.map.save(path)
        return f"saved {self.map.size} keyframes"

    def _load_map(self, path: str) -> str:
        self.map.load(path)
        return f"loaded {self.map.size} keyframes; new keyframes continue from id {self.map.detector.next_id()}"


def main(args: list[str] | None = None) -> int:
    from bevplace_ros.nodes.runtime import run_node

    return run_node(PlaceRecognitionNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
