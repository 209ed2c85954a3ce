"""registration_node: keyframes + loop candidates in, verified (or flagged) loop closures out."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Any

import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Float64MultiArray

from bevplace_ros.device import DEVICE_CHOICES
from bevplace_ros.keyframe_store import KeyframeStoreConfig, KeyframeStoreError
from bevplace_ros.loop_verifier import LoopVerifier, LoopVerifierConfig, UnknownKeyframe
from bevplace_ros.msg import Keyframe, LoopCandidate, LoopClosure, PoseGraphEdge
from bevplace_ros.nodes.conversions import matrix_to_pose, pose_with_covariance, stamp_to_sec
from bevplace_ros.nodes.diagnostics import NodeDiagnostics
from bevplace_ros.nodes.map_services import serve_save_load
from bevplace_ros.nodes.parameters import ParamSpec, config_from_params, declare_parameters, specs_from_config, updated_config
from bevplace_ros.nodes.qos import KEYFRAMES_QOS
from bevplace_ros.nodes.worker import QueueWorker
from bevplace_ros.pointcloud2 import PointCloud2Error, xyz_intensity
from bevplace_ros.registration import RegistrationConfig
from bevplace_ros.registration.registrar import KISS_RETRIES, METHODS, method_options
from bevplace_ros.registration.refine import RefineConfig
from bevplace_ros.registration.verification import VerificationConfig
from bevplace_ros.se3 import xyyaw_to_matrix

PARAMS = [
    ParamSpec("registration.weights", "", "Registration network weights (.pt); empty = the shipped weights.", runtime=False),
    ParamSpec("registration.device", RegistrationConfig.device, "Torch device for the matcher.", choices=DEVICE_CHOICES, runtime=False),
    ParamSpec("registration.method", RegistrationConfig().method, "Global registration: 'kiss_matcher' (KISS-Matcher on per-keyframe FPFH) or 'network' (RoITr-lite); docs/registration.md compares them.", choices=METHODS, runtime=False),
    ParamSpec("registration.classical_fallback", RegistrationConfig.classical_fallback, "With method 'network': retry a rejected pair with KISS-Matcher.", runtime=False),
    ParamSpec("registration.kiss_retry", next(k for k, v in KISS_RETRIES.items() if v == RegistrationConfig.kiss_retry), "KISS-Matcher's second try when its first pose fails verification: 'wider' (mutual top-3 matches, "
              "then a second pose on the matches the first leaves unexplained), 'dense' (0.75 m keypoints, ground left out) or 'none'.",
              choices=tuple(KISS_RETRIES), runtime=False),
    ParamSpec("registration.refine", RefineConfig.enabled, "Refine the coarse pose with small_gicp GICP.", runtime=False),
    *specs_from_config(VerificationConfig, "verification.", {
        "min_fitness": ("Accept a loop only if this share of query points has a match-cloud neighbour after alignment.", 0.0, 1.0),
        "min_inlier_ratio": ("Minimum robust-estimator inlier ratio of the correspondences.", 0.0, 1.0),
        "min_inliers": ("Minimum number of inlier correspondences.", 0, 100000),
        "max_degeneracy": ("Reject a loop whose alignment pins the translation along some direction this many times less "
                           "than each scan does alone (it can slide there, e.g. along a street of repeated facades).",
                           1.0, 1e12),
    }),
    *specs_from_config(LoopVerifierConfig, "verifier.", {
        "min_bev_inliers": ("BEV RANSAC inliers for the BEV 3-DoF guess to be used as a prior.", 0, 10000),
        "prepared_cache_mib": ("Prepared (voxelised, featurised) keyframe clouds kept for reuse, in MiB: each keyframe is featurised once, not once per candidate.", 1.0, 1_000_000.0),
        "region_sectors": ("Second check: azimuth sectors of the region overlap check.", 1, 64),
        "region_radius": ("Second check: only query points this close to the sensor count [m].", 1.0, 500.0),
        "region_distance": ("Second check: a point overlaps when a match point is this close after alignment [m].", 0.01, 10.0),
        "min_region_fitness": ("Second check: a sector overlaps when this share of its points do.", 0.0, 1.0),
        "min_region_share": ("Second check: share of populated sectors that must overlap; 0 disables it.", 0.0, 1.0),
        "bev_max_translation": ("Second check: registration-vs-BEV-guess disagreement allowed [m] (when the guess has min_bev_inliers).", 0.01, 1000.0),
        "bev_max_yaw_deg": ("Second check: registration-vs-BEV-guess yaw disagreement allowed [deg].", 0.01, 180.0),
    }, runtime=False),
    ParamSpec("verifier.use_bev_prior", LoopVerifierConfig.use_bev_prior, "Hand the BEV 3-DoF guess to the registrar as a prior.", runtime=False),
    *specs_from_config(KeyframeStoreConfig, "store.", {
        "max_in_memory": ("Keyframe clouds kept in RAM; older ones spill to disk or are dropped.", 1, 10_000_000),
        "max_on_disk": ("Spilled clouds kept on disk before the oldest are deleted.", 0, 100_000_000),
    }, runtime=False),
    ParamSpec("store.spill_dir", KeyframeStoreConfig.spill_dir, "Folder for spilled clouds; empty drops the oldest instead.", runtime=False),
    ParamSpec("queue_size", 100, "Pending loop candidates; beyond it the oldest are dropped with a warning (dropped.behind: shedding, "
              "step 3, the last resort).", 1, 100000, runtime=False),
    ParamSpec("shed.rank_backlog", 3, "Shedding, step 1: with more candidates of later keyframes waiting than this, candidates of rank >= 1 "
              "are skipped unverified (shed.low_rank); a keyframe's own candidates never count, so a lock-step replay never sheds.",
              0, 100000, runtime=False),
    ParamSpec("shed.redundant_backlog", 6, "Shedding, step 2 (at least step 1's backlog): beyond this backlog, a candidate is skipped when a loop "
              "verified within shed.redundant_window keyframes of both its query and its match exists (shed.redundant).",
              0, 100000, runtime=False),
    ParamSpec("shed.redundant_window", 5, "Keyframe-id neighbourhood of query and match that makes a candidate redundant with a verified loop.",
              0, 100000, runtime=False),
    ParamSpec("keyframes_file", "bevplace_keyframes.npz", "Default file for the save/load services."),
    ParamSpec("publish_pose_graph_edges", True, "Also publish pose_graph_tools-shaped edges on pose_graph_edges."),
    ParamSpec("publish_lio_sam", False, "Also publish [query_stamp, match_stamp] on lio_loop/loop_closure_detection for LIO-SAM."),
    ParamSpec("robot_id", 0, "robot_from / robot_to of the published PoseGraphEdge.", 0, 1000),
]


class RegistrationNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("registration_node", **kwargs)
        self.params = declare_parameters(self, PARAMS, self._on_change)
        p = self.params
        registration = RegistrationConfig(
            weights=p["registration.weights"] or RegistrationConfig.weights, device=p["registration.device"], **method_options(p["registration.method"]),
            classical_fallback=p["registration.classical_fallback"], kiss_retry=KISS_RETRIES[p["registration.kiss_retry"]],
            refine=RefineConfig(enabled=p["registration.refine"]),
            verification=config_from_params(VerificationConfig, p, "verification."),
        )
        self.verifier = LoopVerifier(
            replace(config_from_params(LoopVerifierConfig, p, "verifier."), use_bev_prior=p["verifier.use_bev_prior"]),
            registration,
            replace(config_from_params(KeyframeStoreConfig, p, "store."), spill_dir=p["store.spill_dir"]),
        )
        self.method = ("roitr_lite" + (f"|{registration.classical}" if registration.classical_fallback else "")) if registration.use_network else registration.classical
        self.method += "+gicp" if registration.refine.enabled else ""
        self.keyframes_handled = 0
        self._last_keyframe: int | None = None
        self._early: list[LoopCandidate] = []  # candidates that overtook their keyframe (two topics, no order between them)
        self.closures_published = 0
        self.loops_verified = 0
        if p["shed.rank_backlog"] > p["shed.redundant_backlog"]:
            raise ValueError("need shed.rank_backlog <= shed.redundant_backlog (the order of shedding)")
        self._verified: deque[tuple[int, int]] = deque(maxlen=1000)  # (query, match) ids of recently verified loops
        self.diagnostics = NodeDiagnostics(self, self._counters)
        self.latency_ms = self.diagnostics.stage("registration")
        self.worker = QueueWorker(self._verify, self._worker_error, "registration", p["queue_size"])
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.closure_pub = self.create_publisher(LoopClosure, "loop_closures", reliable)
        self.edge_pub = self.create_publisher(PoseGraphEdge, "pose_graph_edges", reliable)
        self.lio_pub = self.create_publisher(Float64MultiArray, "lio_loop/loop_closure_detection", reliable)
        self.create_subscription(Keyframe, "keyframes", self._on_keyframe, KEYFRAMES_QOS)
        self.create_subscription(LoopCandidate, "loop_candidates", self._on_candidate, reliable)
        serve_save_load(self, "keyframes", lambda: self.params["keyframes_file"], self._save_keyframes, self._load_keyframes,
                        (KeyframeStoreError,))

    def idle(self) -> bool:
        return self.worker.idle()

    def destroy_node(self) -> None:
        if hasattr(self, "worker"):  # absent when the constructor failed (bad parameter, missing weights)
            self.worker.stop()
        super().destroy_node()

    def _on_change(self, values: dict[str, Any]) -> str | None:
        registrar = self.verifier.registrar
        try:
            verification = updated_config(registrar.cfg.verification, values, "verification.")
        except ValueError as err:
            return str(err)
        registrar.cfg = replace(registrar.cfg, verification=verification)
        self.params.update(values)
        return None

    def _counters(self) -> dict[str, int]:
        return {"keyframes": self.keyframes_handled, "candidates": self.worker.handled, "closures": self.closures_published,
                "verified": self.loops_verified, "dropped.behind": self.worker.dropped}

    def _on_keyframe(self, msg: Keyframe) -> None:
        self.keyframes_handled += 1
        self._last_keyframe = int(msg.id)
        try:
            self.verifier.add_keyframe(int(msg.id), xyz_intensity(msg.cloud))
        except PointCloud2Error as err:
            self.diagnostics.skip("unusable cloud", f"keyframe {msg.id}: {err}", what="keyframe")
        early, self._early = self._early, []
        for candidate in early:  # not this keyframe's: verification names the missing keyframe
            self._on_candidate(candidate)

    def _on_candidate(self, msg: LoopCandidate) -> None:
        if self._last_keyframe is not None and int(msg.query_id) == self._last_keyframe + 1 and len(self._early) < 1000:
            self._early.append(msg)  # its keyframe, the next one, is still on its way
            return
        before = self.worker.dropped
        self.worker.submit(msg)
        if self.worker.dropped > before:
            self.diagnostics.warning("dropped.behind", f"registration is behind: dropped {self.worker.dropped} loop candidates so far")

    def _worker_error(self, err: Exception) -> None:
        self.diagnostics.skip("error", f"loop verification failed: {type(err).__name__}: {err}", what="loop candidate")

    def _shed(self, candidate: LoopCandidate) -> bool:
        """Whether to skip `candidate` because candidates of later keyframes pile up; in the stated order (README: nodes)."""
        query, match, p = int(candidate.query_id), int(candidate.match_id), self.params
        backlog = sum(int(c.query_id) != query for c in self.worker.waiting())
        if backlog > p["shed.rank_backlog"] and candidate.rank >= 1:
            self.diagnostics.shed("low_rank", f"registration is behind ({backlog} candidates of later keyframes waiting): skipped "
                                              f"candidate {query}->{match} of rank {candidate.rank}")
            return True
        window = p["shed.redundant_window"]
        if backlog > p["shed.redundant_backlog"] and any(abs(q - query) <= window and abs(m - match) <= window for q, m in self._verified):
            self.diagnostics.shed("redundant", f"registration is behind ({backlog} candidates of later keyframes waiting): skipped "
                                               f"candidate {query}->{match}, a loop near both is verified")
            return True
        return False

    def _verify(self, candidate: LoopCandidate) -> None:
        if self._shed(candidate):
            return
        guess = xyyaw_to_matrix(candidate.bev_x, candidate.bev_y, candidate.bev_yaw) if candidate.bev_inliers else None
        start = time.perf_counter()
        try:
            result = self.verifier.verify(int(candidate.query_id), int(candidate.match_id), guess, int(candidate.bev_inliers))
        except UnknownKeyframe as err:
            self.diagnostics.skip("unknown keyframe", str(err), what="loop candidate")
            return
        closure = LoopClosure(
            header=candidate.header, query_id=candidate.query_id, query_stamp=candidate.query_stamp,
            match_id=candidate.match_id, match_stamp=candidate.match_stamp,
            relative_pose=pose_with_covariance(result.transform, result.covariance_ros()),
            fitness=float(result.fitness), inlier_ratio=float(result.inlier_ratio),
            num_correspondences=int(result.num_correspondences), descriptor_distance=candidate.descriptor_distance,
            verified=bool(result.verified), method=self.method, reason=result.reason,
            latency_ms=(time.perf_counter() - start) * 1e3,
        )
        self.closure_pub.publish(closure)
        self.closures_published += 1
        self.loops_verified += closure.verified
        if closure.verified:
            self._verified.append((int(candidate.query_id), int(candidate.match_id)))
        self.latency_ms.append(closure.latency_ms)
        if self.params["publish_pose_graph_edges"]:
            self.edge_pub.publish(self._edge(closure, result.transform))
        if self.params["publish_lio_sam"] and closure.verified:
            self.lio_pub.publish(Float64MultiArray(data=[stamp_to_sec(closure.query_stamp), stamp_to_sec(closure.match_stamp)]))

    def _edge(self, closure: LoopClosure, T_match_query: np.ndarray) -> PoseGraphEdge:
        robot = self.params["robot_id"]
        return PoseGraphEdge(
            header=closure.header, key_from=closure.match_id, key_to=closure.query_id, robot_from=robot, robot_to=robot,
            type=PoseGraphEdge.LOOPCLOSE if closure.verified else PoseGraphEdge.REJECTED_LOOPCLOSE,
            pose=matrix_to_pose(T_match_query), covariance=closure.relative_pose.covariance,
        )

    def _save_keyframes(self, path: str) -> str:
        return f"saved {self.verifier.save(path)} keyframe clouds"

    def _load_keyframes(self, path: str) -> str:
        return f"loaded {self.verifier.load(path)} keyframe clouds"


def main(args: list[str] | None = None) -> int:
    from bevplace_ros.nodes.runtime import run_node

    return run_node(RegistrationNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
